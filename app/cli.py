"""The command line: ``python main.py <command> ...``."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from app.engines import BatchEngine
from lib.data.layouts import DEFAULT_OPEN_COUNT, DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION
from lib.data.normalise import CT_WINDOW_HU
from lib.io.errors import VolumeReadError
from lib.options_schema import (
    Bounds,
    add_arguments,
    argument_type,
    option_specs,
    option_type,
    options_from_arguments,
)
from lib.reconstruction_methods import METHODS
from lib.reconstruction_options import InputOptions, ReconstructionOptions

# Errors a user can fix: printed as one line, no traceback. OSError covers unwritable or missing
# folders and full disks; MemoryError is reported by main() apart, since it names no file.
USER_ERRORS = (VolumeReadError, ValueError, OSError)
# The reconstruction options each command offers; their flags, defaults, help and bounds come
# from the fields' metadata (lib/reconstruction_options.py, lib/options_schema.py).
RECONSTRUCT_OPTIONS = (
    "target_spacing",
    "steps",
    "samples",
    "eta",
    "seed",
    "batch_size",
    "precision",
    "use_retrieval",
    "use_controlnet",
    "destripe",
    "brain_extraction",
    "alignment",
    "method",
)
BATCH_OPTIONS = ("steps", "seed", "batch_size", "precision", "brain_extraction", "alignment")
# A DICOM folder may hold several series (a 2.5 mm and a 5 mm axial, reformats); `inspect` lists them.
SERIES_UID_HELP = "DICOM: the SeriesInstanceUID to read (default: the best series of the preset's modality)"
# Library messages name the library's parameters; the command line names its flags instead.
FLAG_NAMES = {
    "overwrite=True": "--overwrite",
    "dataset folder (src)": "dataset folder (--src)",
    "resume=True": "--resume",
}


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser that may add some of its arguments when it is first used.

    The training commands take their arguments from the training configs (lib/train), whose
    modules import torch: adding them only when that command runs or shows its help keeps
    ``python main.py --help`` and every other command free of that import.

    Args:
        later: adds the remaining arguments to this parser (None: it has them all).
    """

    def __init__(self, *args: Any, later: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._later = later

    def _complete(self) -> None:
        if self._later is not None:
            later, self._later = self._later, None
            later(self)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> Any:
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._complete()
        return super().format_usage()

    def format_help(self) -> str:
        self._complete()
        return super().format_help()


def config_arguments(module: str, name: str) -> Callable[[argparse.ArgumentParser], None]:
    """Adds an argument for every field of the options dataclass ``name`` of ``module`` (imported then)."""

    def add(parser: argparse.ArgumentParser) -> None:
        options_class = getattr(importlib.import_module(module), name)
        add_arguments(parser, options_class, option_specs(options_class))

    return add


def at_least(kind: type, low: float, exclusive: bool = False) -> Callable[[str], Any]:
    """An argparse type for a number of at least ``low`` (above it when ``exclusive``) that no options
    dataclass describes (``evaluate --sparsity``); refused naming the option, never read as a default."""
    return argument_type(kind, Bounds(low, exclusive_minimum=exclusive))


@contextmanager
def naming_input(path: str | Path) -> Iterator[None]:
    """Let every user error raised in the block name the input ``path``.

    numpy and nibabel fail with messages that name no file ("SVD did not converge",
    "Maximum allowed size exceeded"), and running out of memory names nothing at all.

    Raises:
        VolumeReadError: naming ``path``, for a user error or a MemoryError that does not.
    """
    name = str(Path(path))
    try:
        yield
    except MemoryError as error:
        raise VolumeReadError(
            name, f"not enough memory to process this input ({str(error) or 'MemoryError'})"
        ) from error
    except USER_ERRORS as error:
        if name in str(error):
            raise
        raise VolumeReadError(name, str(error)) from error


def _prepare(args: argparse.Namespace) -> None:
    from app.progress import ProgressBar
    from lib.data.prepare import PrepareConfig, prepare_dataset

    config = PrepareConfig(
        size=args.size,
        ct_window_hu=tuple(args.ct_window),
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        split_seed=args.seed,
    )
    with ProgressBar("prepare", "subject", disable=args.quiet) as bar:
        manifest = prepare_dataset(
            args.layout,
            args.src,
            args.out,
            source=args.source,
            target=args.target,
            config=config,
            open_count=args.subjects,
            max_subjects=args.max_subjects,
            overwrite=args.overwrite,
            progress=bar,
        )
    print(
        f"prepared {len(manifest['subjects'])} subjects ({manifest['counts']}), "
        f"{manifest['total_slices']} slices of {args.size}x{args.size} in {manifest['seconds']} s -> {args.out}"
    )


def _inspect(args: argparse.Namespace) -> None:
    from lib.io import dense_grid, read_volume

    with naming_input(args.input):
        volume = read_volume(args.input, series_uid=args.series_uid, modality=args.modality)
        grid = dense_grid(volume, args.target_spacing)
    report = {
        "source": volume.source,
        "modality": volume.modality,
        "shape": list(volume.shape),
        "pixel_spacing_mm": [round(v, 4) for v in volume.pixel_spacing],
        "acquired_positions_mm": [round(float(p), 3) for p in volume.positions],
        "regular": volume.is_regular(),
        "value_range": [float(volume.array.min()), float(volume.array.max())],
        "dense_grid": {
            "spacing_mm": grid.spacing,
            "slices": grid.shape[2],
            "on_grid_acquired": int(grid.acquired.sum()),
            "gaps": grid.gap_count,
        },
        "series_uid": volume.meta.get("series_uid"),
        "skipped_series": volume.meta.get("skipped_series", {}),
        "skipped_files": volume.meta.get("skipped_files", {}),
        "gantry_tilt_deg": volume.meta.get("gantry_tilt_deg"),
    }
    print(json.dumps(report, indent=1))


def _export_cranium(args: argparse.Namespace) -> None:
    from lib.data.demo_inputs import CRANIUM_DESCRIPTION
    from lib.data.invesalius import read_inv3
    from lib.io.nifti import write_nifti

    volume = read_inv3(args.inv3)
    write_nifti(
        args.out, volume.array.astype(np.int16), volume.voxel_affine(), description=CRANIUM_DESCRIPTION, dtype=np.int16
    )
    print(
        f"wrote {args.out}: {volume.shape} voxels, spacing {volume.pixel_spacing} x "
        f"{volume.slice_steps[0]:.3g} mm, HU {volume.array.min():.0f}..{volume.array.max():.0f}"
    )


def _train_bbdm(args: argparse.Namespace) -> None:
    from app.progress import ProgressBar
    from lib.data.dataset import PreparedDataset
    from lib.diffusion.scheduler import BridgeSchedulerConfig
    from lib.models.denoiser import BBDMConfig
    from lib.train.bbdm import TrainConfig, train_bbdm

    size = int(PreparedDataset(args.data).manifest["config"]["size"])
    config = BBDMConfig.for_channels(
        size, tuple(args.channels), neighbours=args.neighbours, num_res_blocks=args.num_res_blocks
    )
    train_config = TrainConfig(**options_from_arguments(TrainConfig, args))
    with ProgressBar("train-bbdm", disable=args.quiet) as bar:
        scores = train_bbdm(
            args.data,
            args.out,
            config,
            train_config,
            BridgeSchedulerConfig(objective=args.objective),
            device=args.device,
            resume=args.resume,
            progress=bar,
            init=args.init_weights,
            bridge_start=args.bridge_start,
        )
    print(f"trained to iteration {args.iters}: {scores or 'no validation'} -> {args.out}/model.pt")


def _train_retrieval(args: argparse.Namespace) -> None:
    from app.progress import ProgressBar
    from lib.data.dataset import PreparedDataset
    from lib.models.retrieval_encoder import RetrievalConfig
    from lib.train.retrieval import RetrievalTrainConfig, train_retrieval

    size = int(PreparedDataset(args.data).manifest["config"]["size"])
    config = RetrievalConfig(
        image_size=size,
        patch_size=args.patch_size,
        width=args.width,
        depth=args.depth,
        heads=args.heads,
        embedding_dim=args.embedding_dim,
        perceptual_blocks=tuple(args.perceptual_blocks),
    )
    train_config = RetrievalTrainConfig(**options_from_arguments(RetrievalTrainConfig, args))
    with ProgressBar("train-retrieval", disable=args.quiet) as bar:
        accuracy = train_retrieval(
            args.data, args.out, config, train_config, device=args.device, resume=args.resume, progress=bar
        )
    print(
        f"trained to iteration {args.iters}: held-out retrieval accuracy {accuracy or 'not measured'} -> "
        f"{args.out}/encoder.pt"
    )


def _train_controlnet(args: argparse.Namespace) -> None:
    from app.progress import ProgressBar
    from lib.train.controlnet import ControlNetTrainConfig, train_controlnet

    train_config = ControlNetTrainConfig(**options_from_arguments(ControlNetTrainConfig, args))
    with ProgressBar("train-controlnet", disable=args.quiet) as bar:
        scores = train_controlnet(
            args.data,
            args.out,
            args.bbdm,
            args.kb,
            args.encoder,
            train_config,
            device=args.device,
            resume=args.resume,
            progress=bar,
        )
    print(f"trained to iteration {args.iters}: {scores or 'no validation'} -> {args.out}/controlnet.pt")


def _eval_retrieval(args: argparse.Namespace) -> None:
    from lib.data.dataset import PreparedDataset
    from lib.models.retrieval_encoder import load_retrieval_encoder
    from lib.retrieval.evaluation import retrieval_accuracy

    model, _ = load_retrieval_encoder(args.encoder)
    accuracy = retrieval_accuracy(model, PreparedDataset(args.data), args.split, args.position_tolerance)
    print(
        json.dumps(
            {"encoder": args.encoder, "split": args.split, "position_tolerance": args.position_tolerance, **accuracy}
        )
    )


def _half_weights(args: argparse.Namespace) -> None:
    from lib.io.checkpoint import halve_weights

    halve_weights(args.src, args.dst)
    print(f"wrote {args.dst}: {Path(args.dst).stat().st_size / 1e6:.1f} MB (float16 weights)")


def _build_kb(args: argparse.Namespace) -> None:
    from lib.retrieval.build import build_knowledge_base

    kb = build_knowledge_base(
        args.data,
        args.encoder,
        args.out,
        split=args.split,
        tau_percentile=args.tau_percentile,
        overwrite=args.overwrite,
        slice_step=args.slice_step,
    )
    print(
        f"built {args.out}: {len(kb.entries)} entries, tau {kb.tau:.4f} (top {args.tau_percentile} % of random "
        f"pairs), index {kb.manifest.index.kind}"
    )


def _reconstruct(args: argparse.Namespace) -> None:
    from app.progress import ProgressBar
    from lib.data.sparse import simulate_sparse_volume
    from lib.io import read_volume
    from lib.pipeline import ReBrainPipeline
    from lib.presets import load_preset
    from lib.report.outputs import check_output_folder, input_geometry, write_outputs

    # Before anything slow: the result must have somewhere to go.
    check_output_folder(args.out_dir, [args.input])
    preset = load_preset(args.preset, args.weights)
    options = ReconstructionOptions(**options_from_arguments(ReconstructionOptions, args))
    with naming_input(args.input):
        volume = read_volume(args.input, series_uid=args.series_uid, modality=preset.input_modality)
        if args.simulate_sparsity is not None:
            volume = simulate_sparse_volume(volume, factor=args.simulate_sparsity)
    pipeline = ReBrainPipeline.from_preset(preset, device=args.device)
    with ProgressBar("reconstruct", "step", disable=args.quiet) as bar, naming_input(args.input):
        reconstruction = pipeline.reconstruct(volume, options, bar)
    out = write_outputs(args.out_dir, reconstruction, input_geometry(volume, args.simulate_sparsity))
    summary = reconstruction.summary
    print(
        f"wrote {out}/{{mri.nii.gz, uncertainty.nii.gz, provenance.json, preview.png}}: {summary.slices} slices "
        f"({summary.acquired_slices} acquired, {summary.generated_slices} generated, "
        f"{summary.fallback_count} SLERP fallbacks), "
        f"sampling {summary.seconds['sampling']:.1f} s"
    )


def _batch(args: argparse.Namespace) -> int:
    from app.batch import run_batch, run_batch_with
    from lib.pipeline import ReBrainPipeline
    from lib.presets import load_preset

    preset = load_preset(args.preset, args.weights)
    options = ReconstructionOptions(**options_from_arguments(ReconstructionOptions, args))
    common = dict(resume=args.resume, push_url=args.push_dicomweb, progress=not args.quiet)
    if args.engine == BatchEngine.RAY:
        from app.batch_ray import RayOptions, RayRunner

        ray_options = RayOptions(
            address=args.address,
            workers=args.workers,
            cpus_per_worker=args.cpus_per_worker,
            gpus_per_worker=args.gpus_per_worker,
        )
        input_root = Path(args.input_root).resolve()
        with RayRunner(preset, options, args.simulate_sparsity, input_root, ray_options) as runner:
            outcomes = run_batch_with(input_root, args.output_root, runner, preset.input_modality, **common)
    else:
        pipeline = ReBrainPipeline.from_preset(preset, device=args.device)
        outcomes = run_batch(
            args.input_root, args.output_root, pipeline, options, sparsity=args.simulate_sparsity, **common
        )
    counts = {status: sum(o.status == status for o in outcomes) for status in ("done", "complete", "skipped", "failed")}
    print(
        f"{args.output_root}: {counts['done']} series reconstructed, {counts['complete']} already complete, "
        f"{counts['skipped']} skipped (not {preset.input_modality} volumes or unreadable), "
        f"{counts['failed']} failed; see manifest.csv"
    )
    for outcome in outcomes:
        if outcome.status == "failed":
            print(f"failed: series {outcome.series_uid}: {outcome.message}", file=sys.stderr)
    return 1 if counts["failed"] else 0


def _make_preset(args: argparse.Namespace) -> None:
    from lib.presets import assemble_preset

    preset = assemble_preset(
        args.out,
        args.name,
        args.description,
        args.data,
        args.bbdm,
        args.encoder,
        args.kb,
        args.controlnet,
        steps=args.steps,
        position_tolerance=args.position_tolerance,
    )
    print(
        f"wrote preset {preset.name!r} in {preset.root}: {preset.source} -> {preset.target}, files "
        f"{preset.fingerprint()}"
    )


def _score(args: argparse.Namespace) -> None:
    from lib.evaluation.score import score_volumes

    metrics = score_volumes(args.reconstruction, args.reference)
    print(json.dumps({name: round(float(value), 4) for name, value in metrics.items()}, indent=1))


def _evaluate(args: argparse.Namespace) -> None:
    import shlex
    from pathlib import Path

    from app.progress import ProgressBar
    from lib.evaluation.harness import (
        EvaluationConfig,
        EvaluationSubject,
        Variant,
        evaluate_subjects,
        held_out_subjects,
    )
    from lib.evaluation.report import check_report_folder, write_report
    from lib.io import read_volume
    from lib.pipeline import ReBrainPipeline
    from lib.presets import load_preset

    check_report_folder(args.out)  # before hours of evaluation, not after
    config = EvaluationConfig(
        methods=tuple(args.methods),
        sparsities=tuple(args.sparsity),
        seeds=tuple(args.seeds),
        steps=args.steps,
        eta=args.eta,
        batch_size=args.batch_size,
        uncertainty_samples=args.uncertainty_samples,
        variants=(
            Variant(),
            *(
                Variant(name=f"kb={fraction:g}", kb_fraction=fraction)
                for fraction in args.kb_fractions
                if fraction != 1
            ),
            *(Variant(name=f"bbdm={Path(path).resolve().parent.name}", bbdm=path) for path in args.bbdm_variants),
            *(
                Variant(name=f"encoder={Path(path).resolve().parent.name}", encoder=path, data=args.data)
                for path in args.encoder_variants
            ),
        ),
    )
    pipeline = ReBrainPipeline.from_preset(load_preset(args.preset, args.weights), device=args.device)
    if args.input:
        with naming_input(args.input):
            source = read_volume(args.input, series_uid=args.series_uid, modality=pipeline.preset.input_modality)
        subjects = [EvaluationSubject(key="input", split="no ground truth", source=source)]
    else:
        subjects = held_out_subjects(
            pipeline,
            args.layout,
            args.src,
            args.max_subjects,
            open_count=args.open_count if args.open_count is not None else args.subjects + 4,
            prepared_count=args.subjects,
            val_fraction=args.val_fraction,
            test_fraction=args.test_fraction,
            split_seed=args.split_seed,
            splits=args.split,
        )
    with ProgressBar("evaluate", "run") as bar:
        result = evaluate_subjects(pipeline, subjects, config, progress=bar)
    header = {
        "command": "python main.py " + shlex.join(sys.argv[1:]) if sys.argv[1:2] == ["evaluate"] else "evaluate",
        "preset": f"{pipeline.preset.name} ({pipeline.preset.description}); weights {pipeline.versions}",
        "data": f"input scan (no ground truth): {len(subjects)}"
        if args.input
        else f"layout {args.layout}, {len(subjects)} held-out subject(s)",
    }
    out = write_report(args.out, result, header)
    print(f"wrote {out}/{{metrics.csv, report.md, figures/}}: {len(result.rows)} runs")


def _compare_runs(args: argparse.Namespace) -> None:
    from lib.train.bbdm import plot_comparison

    print(f"wrote {plot_comparison(args.runs, args.out)}")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="python main.py", description="ReBrain: sparse head CT to dense brain MRI.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details (series skipped, ...)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)

    prepare = commands.add_parser("prepare", help="preprocess a dataset layout into normalised brain slices")
    prepare.add_argument("--layout", required=True, choices=["brats", "synthrad", "open"])
    prepare.add_argument(
        "--src",
        nargs="+",
        help="dataset folder(s) (brats, synthrad; several folders of one layout are one dataset); for open: "
        "optional folder(s) of BraTS cases whose anatomies (T1, tumour labels or FLAIR) make pseudo-subjects",
    )
    prepare.add_argument("--out", required=True, help="output folder (written atomically)")
    prepare.add_argument("--source", default="t2f", help="brats: source contrast (default t2f)")
    prepare.add_argument("--target", default="t1n", help="brats: target contrast (default t1n)")
    prepare.add_argument("--size", type=int, default=128, help="in-plane size in pixels (default 128)")
    prepare.add_argument(
        "--ct-window",
        type=float,
        nargs=2,
        metavar=("LOW", "HIGH"),
        default=CT_WINDOW_HU,
        help=f"CT input: the HU window mapped to [-1, 1] (default {CT_WINDOW_HU[0]:g} {CT_WINDOW_HU[1]:g})",
    )
    prepare.add_argument(
        "--subjects",
        type=at_least(int, 1),
        default=DEFAULT_OPEN_COUNT,
        help=f"open: number of pseudo-subjects (default {DEFAULT_OPEN_COUNT})",
    )
    prepare.add_argument("--max-subjects", type=int, help="use at most this many subjects")
    prepare.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION)
    prepare.add_argument("--test-fraction", type=float, default=DEFAULT_TEST_FRACTION)
    prepare.add_argument("--seed", type=int, default=0, help="seed of the subject split")
    prepare.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    prepare.set_defaults(run=_prepare)

    inspect = commands.add_parser(
        "inspect", help="read a NIfTI file or DICOM folder and report its geometry and acquired slices"
    )
    inspect.add_argument("input", help="a .nii/.nii.gz file or a DICOM folder")
    inspect.add_argument("--series-uid", help="DICOM: the SeriesInstanceUID to read (default: the CT series)")
    inspect.add_argument("--modality", default="unknown", help="NIfTI: what the values are (CT for HU)")
    inspect.add_argument(
        "--target-spacing",
        type=option_type(ReconstructionOptions, "target_spacing"),
        default=1.0,
        help="dense grid spacing in mm (default 1)",
    )
    inspect.set_defaults(run=_inspect)

    # The training commands' other arguments are the fields of their training config.
    bbdm = commands.add_parser(
        "train-bbdm",
        help="train the CT-to-MRI Brownian-bridge denoiser on a prepared dataset",
        later=config_arguments("lib.train.bbdm", "TrainConfig"),
    )
    bbdm.add_argument("--data", required=True, help="prepared dataset folder (python main.py prepare)")
    bbdm.add_argument("--out", required=True, help="run folder: checkpoints, model.pt, logs, curves")
    bbdm.add_argument(
        "--objective",
        choices=["plain", "directional"],
        default="plain",
        help="training target (default plain: the directional one measured worse here, NOTES.md)",
    )
    bbdm.add_argument(
        "--bridge-start",
        choices=["source", "intensity-map"],
        default="source",
        help="the bridge's input end: the input itself (default), or the input through an intensity lookup table "
        "fitted on the training brains, so that the bridge only carries what the table leaves (a new run only: "
        "--resume and --init-weights keep their bridge)",
    )
    bbdm.add_argument("--num-res-blocks", type=int, default=1, help="residual blocks per UNet level (default 1)")
    bbdm.add_argument("--resume", action="store_true", help="continue the run in --out")
    bbdm.add_argument(
        "--init-weights",
        metavar="MODEL_PT",
        help="start a new run from these BBDM weights (model.pt or a preset's bbdm.pt: fine-tuning, or going on "
        "after a lost checkpoint); --channels, --neighbours and --num-res-blocks must match them, their bridge "
        "settings are kept",
    )
    bbdm.add_argument(
        "--channels",
        type=int,
        nargs="+",
        default=[32, 64, 128, 256],
        help="UNet channels per level (attention at the last)",
    )
    bbdm.add_argument(
        "--neighbours", type=int, default=0, help="CT slices on each side as extra input channels (2.5-D)"
    )
    bbdm.add_argument("--device", default="auto", help="auto, cpu or cuda")
    bbdm.add_argument("--quiet", action="store_true", help="no progress bar")
    bbdm.set_defaults(run=_train_bbdm)

    retrieval = commands.add_parser(
        "train-retrieval",
        help="train the ViT retrieval encoder (contrastive + perceptual loss)",
        later=config_arguments("lib.train.retrieval", "RetrievalTrainConfig"),
    )
    retrieval.add_argument("--data", required=True, help="prepared dataset folder")
    retrieval.add_argument("--out", required=True, help="run folder: checkpoint.pt, encoder.pt, logs")
    retrieval.add_argument("--resume", action="store_true")
    retrieval.add_argument("--patch-size", type=int, default=16)
    retrieval.add_argument("--width", type=int, default=192)
    retrieval.add_argument("--depth", type=int, default=6)
    retrieval.add_argument("--heads", type=int, default=3)
    retrieval.add_argument("--embedding-dim", type=int, default=128)
    retrieval.add_argument(
        "--perceptual-blocks",
        type=int,
        nargs="+",
        default=[1, 3],
        help="transformer blocks whose features feed the perceptual term",
    )
    retrieval.add_argument("--device", default="auto")
    retrieval.add_argument("--quiet", action="store_true")
    retrieval.set_defaults(run=_train_retrieval)

    controlnet = commands.add_parser(
        "train-controlnet",
        help="train the ControlNet guidance on a frozen BBDM with retrieved references",
        later=config_arguments("lib.train.controlnet", "ControlNetTrainConfig"),
    )
    controlnet.add_argument("--data", required=True, help="prepared dataset folder")
    controlnet.add_argument("--bbdm", required=True, help="the trained BBDM's model.pt (kept frozen)")
    controlnet.add_argument("--kb", required=True, help="knowledge base folder (python main.py build-kb)")
    controlnet.add_argument("--encoder", required=True, help="the encoder.pt the knowledge base was built with")
    controlnet.add_argument("--out", required=True, help="run folder: checkpoints, controlnet.pt, logs, curves")
    controlnet.add_argument("--resume", action="store_true", help="continue the run in --out")
    controlnet.add_argument("--device", default="auto", help="auto, cpu or cuda")
    controlnet.add_argument("--quiet", action="store_true", help="no progress bar")
    controlnet.set_defaults(run=_train_controlnet)

    evaluate = commands.add_parser(
        "eval-retrieval", help="retrieval accuracy of an encoder on held-out subjects (METHOD.md protocol)"
    )
    evaluate.add_argument("--data", required=True, help="prepared dataset folder")
    evaluate.add_argument("--encoder", required=True, help="encoder.pt")
    evaluate.add_argument("--split", default="test", help="held-out split (default: test)")
    evaluate.add_argument("--position-tolerance", type=float, default=0.1)
    evaluate.set_defaults(run=_eval_retrieval)

    half = commands.add_parser(
        "half-weights",
        help="copy a model.pt / controlnet.pt with float16 weights (for presets; train a ControlNet "
        "against the halved BBDM)",
    )
    half.add_argument("src", help="weights file (model.pt or controlnet.pt)")
    half.add_argument("dst", help="the float16 copy (written atomically)")
    half.set_defaults(run=_half_weights)

    kb = commands.add_parser("build-kb", help="embed the training CT slices into a FAISS knowledge base")
    kb.add_argument("--data", required=True, help="prepared dataset folder")
    kb.add_argument("--encoder", required=True, help="encoder.pt from train-retrieval")
    kb.add_argument("--out", required=True, help="knowledge base folder (written atomically)")
    kb.add_argument("--split", default="train", help="which subjects go in (default: train)")
    kb.add_argument(
        "--tau-percentile", type=float, default=5.0, help="tau = similarity at the top p %% of random pairs"
    )
    kb.add_argument(
        "--slice-step",
        type=int,
        default=1,
        help="keep every k-th slice of each subject (adjacent 1 mm slices are near-duplicates; default 1)",
    )
    kb.add_argument("--overwrite", action="store_true")
    kb.set_defaults(run=_build_kb)

    recon = commands.add_parser(
        "reconstruct", help="reconstruct a dense synthetic MRI from a sparse CT (NIfTI file or DICOM folder)"
    )
    recon.add_argument("input", help="a NIfTI file or a DICOM folder")
    recon.add_argument("out_dir", help="output folder (written atomically)")
    recon.add_argument("--series-uid", help=SERIES_UID_HELP)
    recon.add_argument(
        "--preset", default="ct2mri", help="preset name in --weights, or a preset folder (default ct2mri)"
    )
    recon.add_argument("--weights", default=None, help="folder of presets (default: the shipped model_weights/)")
    add_arguments(recon, InputOptions, ["simulate_sparsity"])
    add_arguments(recon, ReconstructionOptions, RECONSTRUCT_OPTIONS)
    recon.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    recon.add_argument("--quiet", action="store_true", help="no progress bar")
    recon.set_defaults(run=_reconstruct)

    batch = commands.add_parser(
        "batch", help="every CT series under a folder tree -> synthetic MRI DICOM series, NIfTI, provenance and preview"
    )
    batch.add_argument("input_root", help="folder tree of DICOM files (read only)")
    batch.add_argument("output_root", help="one folder per series, plus manifest.csv and manifest.json")
    batch.add_argument("--preset", default="ct2mri", help="preset name or folder (default ct2mri)")
    batch.add_argument("--weights", default=None, help="folder of presets (default: the shipped model_weights/)")
    add_arguments(batch, ReconstructionOptions, BATCH_OPTIONS)
    add_arguments(batch, InputOptions, ["simulate_sparsity"])
    batch.add_argument(
        "--resume", action="store_true", help="skip series whose outputs are complete; redo half-written ones"
    )
    batch.add_argument(
        "--push-dicomweb",
        default=None,
        metavar="URL",
        help="send each synthetic series to this DICOMweb server (STOW-RS)",
    )
    batch.add_argument("--device", default="auto")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")
    batch.add_argument(
        "--engine",
        choices=[engine.value for engine in BatchEngine],
        default=BatchEngine.LOCAL.value,
        help="local: the series one after another in this process (default); ray: on a Ray cluster's workers",
    )
    batch.add_argument(
        "--address",
        default=None,
        help="ray: 'auto' (the cluster this machine joined) or the head's HOST:PORT; default: a Ray "
        "instance started on this machine for the run",
    )
    batch.add_argument("--workers", type=at_least(int, 1), default=2, help="ray: long-lived workers (default 2)")
    batch.add_argument(
        "--cpus-per-worker", type=at_least(float, 0, exclusive=True), default=1.0, help="ray: CPU cores per worker"
    )
    batch.add_argument(
        "--gpus-per-worker", type=at_least(float, 0), default=0.0, help="ray: GPUs per worker (0: CPU workers)"
    )
    batch.set_defaults(run=_batch)

    make_preset = commands.add_parser(
        "make-preset", help="assemble trained weights and a knowledge base into a preset folder"
    )
    make_preset.add_argument("--name", required=True)
    make_preset.add_argument("--description", required=True)
    make_preset.add_argument("--data", required=True, help="the prepared dataset the models were trained on")
    make_preset.add_argument("--bbdm", required=True, help="BBDM model.pt")
    make_preset.add_argument("--encoder", required=True, help="retrieval encoder.pt")
    make_preset.add_argument("--kb", required=True, help="knowledge-base folder (build-kb)")
    make_preset.add_argument("--controlnet", default=None, help="controlnet.pt (optional)")
    make_preset.add_argument(
        "--steps", type=option_type(ReconstructionOptions, "steps"), default=10, help="default sampling steps"
    )
    make_preset.add_argument("--position-tolerance", type=float, default=0.1)
    make_preset.add_argument("--out", required=True, help="preset folder, e.g. model_weights/ct2mri")
    make_preset.set_defaults(run=_make_preset)

    score = commands.add_parser(
        "score", help="NRMSE, PSNR, SSIM and I-SSIM of a reconstructed MRI against a ground-truth MRI"
    )
    score.add_argument("reconstruction", help="mri.nii.gz written by reconstruct")
    score.add_argument("reference", help="the ground-truth MRI on the same grid (skull-stripped: 0 outside the brain)")
    score.set_defaults(run=_score)

    evaluate = commands.add_parser(
        "evaluate", help="the evaluation protocol: methods x sparsity x seeds on held-out subjects, with a report"
    )
    where = evaluate.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--layout", choices=["brats", "synthrad", "open"], help="dataset layout with ground truth (see prepare)"
    )
    where.add_argument(
        "--input",
        help="one real scan without ground truth (NIfTI or DICOM folder): continuity, retrieval, tissue check, banding",
    )
    evaluate.add_argument("--series-uid", help=SERIES_UID_HELP + " of --input")
    evaluate.add_argument(
        "--src", nargs="+", help="dataset folder(s) as given to prepare, in its order (brats, synthrad; open: optional)"
    )
    evaluate.add_argument("--preset", default="ct2mri", help="preset name in --weights, or a preset folder")
    evaluate.add_argument("--weights", default=None, help="folder of presets (default: the shipped model_weights/)")
    evaluate.add_argument(
        "--sparsity",
        type=at_least(int, 1),
        nargs="+",
        default=[2],
        help="keep every k-th slice (default 2); 1 keeps all (a real sparse scan)",
    )
    evaluate.add_argument("--seeds", type=option_type(ReconstructionOptions, "seed"), nargs="+", default=[0, 1, 2])
    evaluate.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="default: all")
    evaluate.add_argument(
        "--max-subjects", type=at_least(int, 1), default=None, help="evaluate at most this many held-out subjects"
    )
    evaluate.add_argument(
        "--split",
        nargs="+",
        choices=("val", "test", "unseen"),
        help="evaluate only held-out subjects of these splits (default: all held out)",
    )
    evaluate.add_argument(
        "--val-fraction",
        type=float,
        default=DEFAULT_VAL_FRACTION,
        help="as given to prepare: recomputes the split (default %(default)s)",
    )
    evaluate.add_argument(
        "--test-fraction",
        type=float,
        default=DEFAULT_TEST_FRACTION,
        help="as given to prepare: recomputes the split (default %(default)s)",
    )
    evaluate.add_argument("--split-seed", type=int, default=0, help="prepare's --seed (default %(default)s)")
    evaluate.add_argument(
        "--subjects",
        type=at_least(int, 1),
        default=DEFAULT_OPEN_COUNT,
        help=f"open: as given to prepare: its pseudo-subjects are split (default {DEFAULT_OPEN_COUNT})",
    )
    evaluate.add_argument(
        "--open-count",
        type=at_least(int, 1),
        default=None,
        help="open: pseudo-subjects to generate (default --subjects + 4); those beyond --subjects are unseen",
    )
    add_arguments(evaluate, ReconstructionOptions, ["steps"])
    evaluate.add_argument(
        "--eta",
        type=option_type(ReconstructionOptions, "eta"),
        default=0.0,
        help="sampler noise (default 0: deterministic)",
    )
    add_arguments(evaluate, ReconstructionOptions, ["batch_size"])
    evaluate.add_argument(
        "--uncertainty-samples",
        type=at_least(int, 0),
        default=0,
        help="> 1: one extra rebrain run with that many samples for the uncertainty figure",
    )
    evaluate.add_argument(
        "--kb-fractions",
        type=at_least(float, 0, exclusive=True),
        nargs="+",
        default=[],
        help="ablation: shares of the knowledge base's subjects kept, e.g. 0.7 0.5 0.3 (Table 5)",
    )
    evaluate.add_argument(
        "--bbdm-variants",
        nargs="+",
        default=[],
        help="ablation: other BBDM model.pt files, e.g. the other objective's (Table 2); named by their folder",
    )
    evaluate.add_argument(
        "--encoder-variants",
        nargs="+",
        default=[],
        help="ablation: other retrieval encoder.pt files (Table 3); needs --data; named by their folder",
    )
    evaluate.add_argument(
        "--data", default=None, help="the prepared dataset the preset was trained on (for --encoder-variants)"
    )
    evaluate.add_argument("--device", default="cpu")
    evaluate.add_argument("--out", required=True, help="report folder (written atomically)")
    evaluate.set_defaults(run=_evaluate)

    compare = commands.add_parser("compare-runs", help="overlay the validation curves of training runs in one PNG")
    compare.add_argument("runs", nargs="+", help="run folders (with validation.csv)")
    compare.add_argument("--out", required=True, help="output PNG")
    compare.set_defaults(run=_compare_runs)

    cranium = commands.add_parser(
        "export-cranium", help="write Debian's real head CT (invesalius-examples) as NIfTI in HU"
    )
    cranium.add_argument("--inv3", default="/usr/share/doc/invesalius-examples/examples/Cranium.inv3")
    cranium.add_argument("--out", required=True, help="output .nii.gz")
    cranium.set_defaults(run=_export_cranium)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (2 for a user error, with a one-line message)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        code = args.run(args)
    except USER_ERRORS as error:
        message = str(error)
        for words, flag in FLAG_NAMES.items():
            message = message.replace(words, flag)
        print(f"error: {message}", file=sys.stderr)
        return 2
    except MemoryError as error:
        print(f"error: not enough memory for {args.command} ({str(error) or 'MemoryError'})", file=sys.stderr)
        return 2
    return code or 0
