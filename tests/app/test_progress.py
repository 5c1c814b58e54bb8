"""The command line's progress bar over the library's progress callback."""

from __future__ import annotations

from app.progress import ProgressBar


def test_the_bar_follows_the_library_and_prints_messages_as_lines(capsys):
    with ProgressBar("reconstruct", "step") as bar:
        for done in range(201):
            bar(done, 200)
        bar(200, 200, "validation PSNR 20.00 dB")
    captured = capsys.readouterr()
    assert "200/200" in captured.err and "validation PSNR 20.00 dB\n" in captured.out + captured.err
    # 201 fast updates redraw a handful of times (tqdm's minimum interval), not once per step:
    # a log file of a long run stays readable.
    assert captured.err.count("\r") < 20, captured.err.count("\r")


def test_a_quiet_bar_prints_nothing_and_no_report_draws_no_bar(capsys):
    with ProgressBar("reconstruct", disable=True) as bar:
        bar(1, 2, "a line")
    with ProgressBar("never used"):
        pass
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
