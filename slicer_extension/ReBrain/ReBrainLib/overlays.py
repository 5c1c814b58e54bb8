"""The per-slice provenance of a result as arrays, colours and table rows for display."""

from __future__ import annotations

import numpy as np

# Labelmap values of the slice-status overlay (as the server's status output).
STATUS_CODES = {"acquired": 1, "retrieved": 2, "fallback": 3}
# Status label -> (name, RGBA in 0..1). Retrieved slices are left transparent: the similarity
# overlay shows them; acquired slices are real data (green), fallbacks need attention (orange).
STATUS_COLOURS = {
    1: ("acquired slice (real CT data)", (0.2, 0.8, 0.2, 0.5)),
    2: ("retrieved reference guided the slice", (0.0, 0.0, 0.0, 0.0)),
    3: ("SLERP fallback (no similar reference)", (1.0, 0.55, 0.0, 0.8)),
}


def slice_overlays(params: dict, shape_kji: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Similarity and status volumes (``[k, j, i]``, as Slicer arrays) from the provenance.

    Slice ``k`` of the MRI is provenance entry ``k`` (the server writes the dense axis last in
    NIfTI, which is Slicer's first array axis).

    Returns:
        float32 similarity (NaN where a slice had no retrieval) and uint8 status codes.

    Raises:
        ValueError: the provenance has another number of slices than the volume.
    """
    slices = params["slices"]
    if len(slices) != shape_kji[0]:
        raise ValueError(f"provenance has {len(slices)} slices, the volume {shape_kji[0]}")
    similarity = np.array([np.nan if s["similarity"] is None else s["similarity"] for s in slices], dtype=np.float32)
    status = np.array([STATUS_CODES[name] for name in params["slice_status"]], dtype=np.uint8)
    return (
        np.broadcast_to(similarity[:, None, None], shape_kji).copy(),
        np.broadcast_to(status[:, None, None], shape_kji).copy(),
    )


def similarity_colour_table(tau: float, entries: int = 256) -> np.ndarray:
    """RGBA rows for similarities 0..1 (``entries`` steps): cool below tau, warm at or above it.

    The hue jumps at tau, so the threshold is visible on the slices and in the legend.
    """
    values = np.linspace(0.0, 1.0, entries)
    table = np.zeros((entries, 4))
    below = values < tau
    t_low = values[below] / max(tau, 1e-6)
    table[below] = np.stack(
        [0.1 * np.ones_like(t_low), 0.2 + 0.6 * t_low, 0.9 * np.ones_like(t_low), 0.6 * np.ones_like(t_low)], axis=1
    )
    t_high = (values[~below] - tau) / max(1.0 - tau, 1e-6)
    table[~below] = np.stack(
        [np.ones_like(t_high), 0.9 - 0.7 * t_high, 0.1 * np.ones_like(t_high), 0.6 * np.ones_like(t_high)], axis=1
    )
    return table


def legend_text(params: dict) -> str:
    """One paragraph for the widget: what the colours mean, tau and the counts."""
    summary = params["summary"]
    counts = {name: params["slice_status"].count(name) for name in STATUS_CODES}
    rate = summary.get("generated_retrieval_success_rate")
    return (
        "Similarity overlay: warm (yellow to red) = top-1 retrieval similarity at or above tau = "
        f"{summary['tau']:.4f}, "
        f"a reference slice guided the synthesis; cool (blue) = below tau. "
        f"Status overlay: green = acquired slice ({counts['acquired']}), orange = SLERP fallback "
        f"({counts['fallback']}); "
        f"{counts['retrieved']} generated slices used a retrieved reference"
        + (f" ({rate:.0%} of generated slices)." if rate is not None else ".")
    )


def _tissue_text(check: dict) -> str:
    """The tissue-consistency check (the summary's ``tissue_check``) in one sentence."""
    means, effect = check.get("t1_mean") or {}, check.get("cohen_d") or {}
    dice, chance = check.get("csf_dice"), check.get("csf_dice_chance")
    overlap = f", CSF Dice {dice:.2f} (chance {chance:.2f})" if dice is not None and chance is not None else ""
    order = check.get("order_holds")
    if order is None:
        text = f"Tissue check: a tissue class is empty in the CT, order not measured{overlap}."
    elif order:
        d = [effect.get(name) for name in ("white_grey", "grey_csf")]
        sizes = f" (d {d[0]:.2f} / {d[1]:.2f})" if None not in d else ""
        text = f"Tissue check: white > grey > CSF holds{sizes}{overlap}."
    else:
        text = (
            "Tissue check: white > grey > CSF does NOT hold (T1 means white "
            f"{means['white']:.2f}, grey {means['grey']:.2f}, CSF {means['csf']:.2f}){overlap}."
        )
    return text + _atlas_text(check.get("atlas") or {})


def _atlas_text(atlas: dict) -> str:
    """The atlas half of the tissue check in one clause ("" when the result has none)."""
    if "error" in atlas:
        return f" Atlas regions: not measured ({atlas['error']})."
    order = atlas.get("order_holds")
    if order is None:
        return ""
    d, ct_d = (atlas.get("cohen_d") or {}).get("white_grey"), atlas.get("ct_d_grey_white")
    sizes = ""
    if d is not None:
        contrast = f"; the CT's own grey/white contrast d {ct_d:.2f}" if ct_d is not None else ""
        sizes = f" (d white-grey {d:.2f}{contrast})"
    return f" Atlas regions: white > grey > CSF {'holds' if order else 'does NOT hold'}{sizes}."


def status_text(summary: dict, elapsed_s: float) -> str:
    """The widget's status line after a reconstruction: counts, where the positions came from,
    the tissue-consistency check (CT presets) and the banding ratio, each when the result has it
    (a server older than these checks, or an MRI preset, leaves them out).

    Args:
        summary: the result's ``summary`` (provenance.json's).
        elapsed_s: seconds the request took.
    """
    positions = "CT head template" if (summary.get("alignment") or {}).get("applied") else "brain extent"
    parts = [
        f"Done in {elapsed_s:.0f} s: {summary['slices']} slices, {summary['fallback_count']} SLERP fallbacks, "
        f"slice positions from the {positions}."
    ]
    if summary.get("tissue_check"):
        parts.append(_tissue_text(summary["tissue_check"]))
    banding = summary.get("banding") or {}
    if banding.get("brightness_ratio") is not None:
        voxel = banding.get("voxel_ratio")
        parts.append(
            f"Banding: acquired/generated jumps {banding['brightness_ratio']:.2f}x the generated ones"
            + (f" ({voxel:.2f}x voxelwise)" if voxel is not None else "")
            + "; 1 = no stripes."
        )
    parts.append("SYNTHETIC image.")
    return " ".join(parts)


TABLE_COLUMNS = ("slice", "position_mm", "status", "similarity", "reference", "uncertainty_mean")


def provenance_rows(params: dict) -> list[dict]:
    """One row per output slice with :data:`TABLE_COLUMNS`."""
    rows = []
    for record, status in zip(params["slices"], params["slice_status"]):
        rows.append(
            {
                "slice": record["index"],
                "position_mm": round(record["position_mm"], 3),
                "status": status,
                "similarity": None if record["similarity"] is None else round(record["similarity"], 4),
                "reference": record["reference"] or "",
                "uncertainty_mean": round(record["uncertainty_mean"], 5),
            }
        )
    return rows
