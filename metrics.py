"""Segmentation metrics per organ, in physical units, and their reports (screen table, CSV, JSON).

All metrics compare a predicted and a reference label map (X, Y, Z) of one grid, organ by organ
(utils.LABELS). The grid is given by its affine (4, 4; voxel index -> mm), or by voxel spacing
(mm) along the array axes for an axis-aligned grid. Voxel volume is |det(affine[:3, :3])| and
distances are between voxel centres mapped through the affine, so a sheared grid (gantry-tilted
CT) is measured in true mm; on an axis-aligned grid both are MONAI's.

- Dice, precision (TP / predicted), recall (TP / reference), from voxel counts.
- Reference and predicted volume (mL), volume difference (predicted - reference, mL and % of the
  reference).
- HD95 (mm): the symmetric 95th-percentile Hausdorff distance, as MONAI's
  compute_hausdorff_distance(percentile=95): surface voxels are a mask's voxels that a 6-neighbour
  erosion removes (the volume's border counts as outside), each surface voxel's distance to the
  other surface is Euclidean in mm (physical coordinates), and HD95 is the larger of the two directed 95th percentiles
  (linear interpolation).
- NSD (normalised surface Dice) at a tolerance tau (mm): the share of both surfaces' voxels lying
  within tau of the other surface, as MONAI's compute_surface_dice(use_subvoxels=False).

Empty masks (documented choice, no NaN): an organ absent from both maps scores Dice, precision,
recall and NSD 1 and HD95 0 (nothing to find, nothing found). Absent from one map only, it scores
Dice, precision, recall and NSD 0 and HD95 infinite; infinity is written "inf" in CSV and null in
JSON, and the mean row's HD95 averages the finite values only (the JSON says how many).
Volume difference in % is null when the reference is empty.

Everything is computed inside the bounding box of the two masks of an organ, which holds both
surfaces, so the result is exact and costs the organ's size, not the scan's.

Statistics (no reference needed, organ_statistics): per organ the voxel count, volume (count x
|det| of the affine's 3x3 part, mL), mean and median HU, and the bounding box in mm: the smallest
box, aligned with the world axes, that holds the organ's voxel centres, in the NIfTI affine's RAS+
world (x towards the patient's right, y anterior, z superior; DICOM's LPS negates x and y).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import torch
from numpy.typing import ArrayLike
from scipy import ndimage

from utils import LABELS, ORGANS, atomic_write, find_boxes

METRICS: list[str] = ["dice", "precision", "recall", "ref_ml", "pred_ml", "vol_diff_ml", "vol_diff_pct",
                      "hd95_mm", "nsd"]
# Header shown on screen per metric; the NSD column names its tolerance.
SHORT = {"dice": "Dice", "precision": "Prec", "recall": "Recall", "ref_ml": "Ref mL", "pred_ml": "Pred mL",
         "vol_diff_ml": "dV mL", "vol_diff_pct": "dV %", "hd95_mm": "HD95 mm", "nsd": "NSD"}


def _ratio(num: int, den: int, both_empty: bool) -> float:
    if den == 0:
        return 1.0 if both_empty else 0.0
    return num / den


def overlap_scores(pred: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Dice, precision and recall of two boolean masks of one shape (empty masks: module docstring)."""
    tp = int(np.count_nonzero(pred & ref))
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    return _scores_from_counts(tp, n_pred, n_ref)


def _scores_from_counts(tp: int, n_pred: int, n_ref: int) -> dict[str, float]:
    both_empty = n_pred == 0 and n_ref == 0
    return {"dice": _ratio(2 * tp, n_pred + n_ref, both_empty),
            "precision": _ratio(tp, n_pred, both_empty),
            "recall": _ratio(tp, n_ref, both_empty)}


def bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """Smallest box holding every True voxel of a boolean mask (None when empty), from its
    projections: one fast pass per axis, whatever the array's memory order."""
    box = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hits.size == 0:
            return None
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def surface(mask: np.ndarray) -> np.ndarray:
    """Boolean surface voxels of a mask: those a 6-neighbour erosion removes; voxels on the array's
    border count as surface (outside the array is background), as in MONAI's get_mask_edges."""
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def voxel_matrix(grid: ArrayLike) -> np.ndarray:
    """The (3, 3) float64 map from voxel index steps to mm: affine[:3, :3] of a (4, 4) or (3, 3)
    affine, or diag(spacing) of three voxel sizes (mm)."""
    m = np.asarray(grid, dtype=np.float64)
    if m.shape in ((4, 4), (3, 3)):
        return m[:3, :3]
    if m.shape == (3,):
        return np.diag(m)
    raise ValueError(f"expected an affine (4, 4) or three voxel sizes, got shape {m.shape}")


def voxel_volume_ml(grid: ArrayLike) -> float:
    """Volume of one voxel (mL): |det(affine[:3, :3])| / 1000, right on sheared grids too."""
    return abs(float(np.linalg.det(voxel_matrix(grid)))) / 1000.0


def surface_distances(pred: np.ndarray, ref: np.ndarray, grid: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm, float64) from each surface voxel of pred to the surface of ref, and from each
    surface voxel of ref to the surface of pred. Both masks non-empty, boolean, one shape; grid is
    the affine (4, 4) or the voxel spacing (mm) (voxel_matrix).

    Exact Euclidean distances between voxel centres in physical mm (index mapped through the
    affine): on an axis-aligned grid the values scipy's
    distance_transform_edt(~surface, sampling=spacing) gives at the other surface (tested), found
    with a k-d tree over the surface voxels, which costs the surfaces' size (~1 s for a liver)
    where the transform costs its bounding box's volume (~4 s per direction)."""
    from scipy.spatial import cKDTree

    box = bounding_box(pred | ref)
    p = np.pad(pred[box], 1)  # padding keeps the array border a surface after cropping
    r = np.pad(ref[box], 1)
    to_mm = voxel_matrix(grid).T  # row vectors of indices -> mm (the translation cancels)
    points_p = np.argwhere(surface(p)) @ to_mm
    points_r = np.argwhere(surface(r)) @ to_mm
    to_ref = cKDTree(points_r, leafsize=32).query(points_p, k=1, workers=-1)[0]
    to_pred = cKDTree(points_p, leafsize=32).query(points_r, k=1, workers=-1)[0]
    return to_ref, to_pred


def hd95_nsd(pred: np.ndarray, ref: np.ndarray, grid: ArrayLike, tolerance: float = 2.0) -> tuple[float, float]:
    """(HD95 in mm, NSD at tolerance mm) of two boolean masks on grid (an affine (4, 4) or the
    voxel spacing, mm; voxel_matrix) (empty masks: module docstring)."""
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if not has_pred and not has_ref:
        return 0.0, 1.0
    if not has_pred or not has_ref:
        return math.inf, 0.0
    d_pr, d_rp = surface_distances(pred, ref, grid)
    hd = max(float(np.quantile(d_pr, 0.95)), float(np.quantile(d_rp, 0.95)))
    within = tolerance + 1e-6  # a distance equal to the tolerance counts, whatever its last bit of rounding
    nsd = (np.count_nonzero(d_pr <= within) + np.count_nonzero(d_rp <= within)) / (d_pr.size + d_rp.size)
    return hd, float(nsd)


def organ_metrics(pred: np.ndarray, ref: np.ndarray, grid: ArrayLike, tolerance: float = 2.0
                  ) -> dict[str, dict[str, float | None]]:
    """All metrics (METRICS) for each organ of two label maps (X, Y, Z) in our label map, on one grid
    given by its affine (4, 4), or by voxel spacing (mm) along the array axes when axis-aligned.
    {organ: {metric: value}}; volume difference in % is None for an empty reference, HD95 is inf
    when exactly one map lacks the organ."""
    if pred.shape != ref.shape:
        raise ValueError(f"prediction {pred.shape} and reference {ref.shape} differ in shape")
    grid = voxel_matrix(grid)
    voxel_ml = voxel_volume_ml(grid)
    out = {}
    for value, organ in LABELS.items():
        if value == 0:
            continue
        p, r = pred == value, ref == value
        # Both masks lie inside the box of their union: every metric on that crop is the scan's.
        box = bounding_box(p | r)
        if box is None:
            p = r = np.zeros((1, 1, 1), bool)
        else:
            p, r = p[box], r[box]
        tp, n_pred, n_ref = (int(np.count_nonzero(m)) for m in (p & r, p, r))
        row: dict[str, float | None] = dict(_scores_from_counts(tp, n_pred, n_ref))
        row["ref_ml"] = n_ref * voxel_ml
        row["pred_ml"] = n_pred * voxel_ml
        row["vol_diff_ml"] = (n_pred - n_ref) * voxel_ml
        row["vol_diff_pct"] = 100.0 * (n_pred - n_ref) / n_ref if n_ref else None
        row["hd95_mm"], row["nsd"] = hd95_nsd(p, r, grid, tolerance)
        out[organ] = row
    return out


# ---------------------------------------------------------------------------------------------
# Reports


def mean_row(cases: dict[str, dict[str, dict]]) -> tuple[dict[str, dict[str, float | None]], dict[str, int]]:
    """Per organ and metric, the mean over cases of the finite values; also, per organ, how many
    cases had a finite HD95."""
    mean: dict[str, dict[str, float | None]] = {}
    finite_hd: dict[str, int] = {}
    for organ in ORGANS:
        mean[organ] = {}
        for m in METRICS:
            values = [c[organ][m] for c in cases.values() if c[organ][m] is not None and math.isfinite(c[organ][m])]
            mean[organ][m] = float(np.mean(values)) if values else None
            if m == "hd95_mm":
                finite_hd[organ] = len(values)
    return mean, finite_hd


def _fmt(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    if metric in ("dice", "precision", "recall", "nsd"):
        return f"{value:.4f}"
    return f"{value:.1f}"


def format_table(scores: dict[str, dict[str, float | None]], tolerance: float, title: str = "") -> str:
    """A fixed-width table, one line per organ, for the screen."""
    head = {**SHORT, "nsd": f"NSD@{tolerance:g}mm"}
    widths = {m: max(len(head[m]), 7) for m in METRICS}
    lines = [title] if title else []
    lines.append(f"  {'organ':<13}" + " ".join(f"{head[m]:>{widths[m]}}" for m in METRICS))
    for organ, row in scores.items():
        lines.append(f"  {organ:<13}" + " ".join(f"{_fmt(row[m], m):>{widths[m]}}" for m in METRICS))
    return "\n".join(lines)


def _json_value(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


def write_reports(cases: dict[str, dict[str, dict]], prefix: str | Path, tolerance: float,
                  warnings: dict[str, list[str]] | None = None) -> tuple[Path, Path]:
    """prefix.csv (a row per case, then a row "mean"; columns case, then organ_metric) and
    prefix.json (the same, plus notes and each warned case's warnings: infer.coverage_warnings),
    written atomically. Returns both paths."""
    prefix = Path(prefix)
    csv_path, json_path = prefix.with_name(prefix.name + ".csv"), prefix.with_name(prefix.name + ".json")
    mean, finite_hd = mean_row(cases)
    columns = ["case"] + [f"{o}_{m}" for o in ORGANS for m in METRICS]

    def row(name: str, scores: dict) -> list[str]:
        cells = [name]
        for o in ORGANS:
            for m in METRICS:
                v = scores[o][m]
                cells.append("" if v is None else ("inf" if math.isinf(v) else f"{v:.6g}"))
        return cells

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for name, scores in cases.items():
        w.writerow(row(name, scores))
    w.writerow(row("mean", mean))
    text = buf.getvalue()
    atomic_write(csv_path, lambda tmp: tmp.write_text(text))

    report = {
        "tolerance_mm": tolerance,
        "metrics": METRICS,
        "cases": {n: {o: {m: _json_value(v) for m, v in s.items()} for o, s in c.items()} for n, c in cases.items()},
        "mean": {o: {m: _json_value(v) for m, v in s.items()} for o, s in mean.items()},
        "hd95_cases_in_mean": finite_hd,
        "warnings": warnings or {},
        "notes": ("An organ absent from both prediction and reference scores Dice, precision, recall and NSD 1, "
                  "HD95 0; absent from one only, 0 and HD95 infinite, written null here and 'inf' in the CSV. "
                  "Means are over finite values: hd95_cases_in_mean counts the cases in each HD95 mean. "
                  "vol_diff_pct is null for an empty reference."),
    }
    atomic_write(json_path, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    return csv_path, json_path


STATISTICS: list[str] = ["voxels", "volume_ml", "mean_hu", "median_hu", "bbox_min_mm", "bbox_max_mm"]
BBOX_CONVENTION = ("RAS+ world mm of the mask's affine (x towards the patient's right, y anterior, z superior): "
                   "the smallest world-axis-aligned box that holds the organ's voxel centres")


def _mean_median(values: np.ndarray) -> tuple[float, float]:
    """Mean and median of a non-empty 1D array of HU. Integer HU (what scanners store) go through a
    histogram: exact, and several times faster than converting and partitioning millions of voxels."""
    if values.dtype.kind not in "iu":
        values = values.astype(np.float64)
        return float(values.mean()), float(np.median(values))
    lo = int(values.min())
    shifted = values.astype(np.intp)
    shifted -= lo
    return _histogram_mean_median(np.bincount(shifted), lo)


def _histogram_mean_median(counts: np.ndarray, lo: int) -> tuple[float, float]:
    """Mean and median of the integer HU whose counts are `counts` (counts[i]: voxels at lo + i HU; not all 0)."""
    n = int(counts.sum())
    levels = np.arange(lo, lo + len(counts), dtype=np.int64)
    mean = float((counts * levels).sum() / n)
    rank = np.cumsum(counts)
    low = int(levels[np.searchsorted(rank, (n - 1) // 2, side="right")])
    high = int(levels[np.searchsorted(rank, n // 2, side="right")])
    return mean, (low + high) / 2


def _scan_histograms(labels: np.ndarray, hu: np.ndarray, organs: int, chunk: int = 1 << 23
                     ) -> tuple[np.ndarray, int] | None:
    """Per label 0..organs, the histogram of integer HU (organs + 1, hi - lo + 1) int64 and lo, in one pass over
    the scan (labels uint8 and hu of one shape and memory order), chunk voxels at a time (bounded memory); labels
    above organs are not counted. None where hu's range is too wide for the histograms (over 2**24 bins)."""
    lo, hi = int(hu.min()), int(hu.max())
    levels = hi - lo + 1
    bins = (organs + 1) * levels
    if bins > 1 << 24:
        return None
    flat_labels = torch.from_numpy(np.ravel(labels, order="K"))
    flat_hu = torch.from_numpy(np.ravel(hu, order="K"))
    counts = torch.zeros(bins, dtype=torch.int64)
    for s in range(0, flat_labels.numel(), chunk):
        index = flat_labels[s:s + chunk].to(torch.int32).mul_(levels)
        index += flat_hu[s:s + chunk].to(torch.int32) - lo
        counts += torch.bincount(index, minlength=bins)[:bins]
    return counts.view(organs + 1, levels).numpy(), lo


def organ_statistics(labels: np.ndarray, hu: np.ndarray, affine: np.ndarray) -> dict[str, dict]:
    """Per organ of a label map (X, Y, Z) on the CT's grid (hu (X, Y, Z), HU; affine (4, 4), mm):
    voxels (int), volume_ml (voxels x |det(affine[:3, :3])| / 1000), mean_hu and median_hu, and
    bbox_min_mm / bbox_max_mm ([x, y, z], BBOX_CONVENTION). An absent organ has 0 voxels, 0 mL and
    null HU and box."""
    affine = np.asarray(affine, dtype=np.float64)
    voxel_ml = voxel_volume_ml(affine)
    boxes = find_boxes(labels, len(ORGANS))
    fortran = all(a.flags.f_contiguous and not a.flags.c_contiguous for a in (labels, hu))
    histograms = None
    boxed = sum(math.prod(s.stop - s.start for s in box) for box in boxes if box is not None)
    same_order = fortran or (labels.flags.c_contiguous and hu.flags.c_contiguous)
    if (boxed > labels.size / 2 and same_order and labels.dtype == np.uint8
            and hu.dtype in (np.int8, np.uint8, np.int16, np.int32)):
        # Organs whose boxes cover much of the scan (an untrained model's mask): one histogram pass over the scan
        # costs less than gathering each box's voxels (0.11 against 0.7 s on 512x512x129), with the same figures.
        histograms = _scan_histograms(labels, hu, len(ORGANS))
    stats = {}
    for value, organ in enumerate(ORGANS, start=1):
        box = boxes[value - 1]
        if box is None:
            stats[organ] = {"voxels": 0, "volume_ml": 0.0, "mean_hu": None, "median_hu": None, "bbox_min_mm": None,
                            "bbox_max_mm": None}
            continue
        if histograms is not None:
            counts, lo = histograms[0][value], histograms[1]
            voxels = int(counts.sum())
            mean_hu, median_hu = _histogram_mean_median(counts, lo)
        else:
            # NIfTI maps are Fortran-ordered: boolean indexing walks C order, so it goes through the transposes
            # (the values' order does not matter here), 15x faster on a 512x512x129 scan.
            values = hu.T[box[::-1]][labels.T[box[::-1]] == value] if fortran else hu[box][labels[box] == value]
            voxels = int(values.size)
            mean_hu, median_hu = _mean_median(values)
        # The index box's eight corner voxel centres bound the organ's centres in the world, oblique grids included.
        ends = [(s.start, s.stop - 1) for s in box]
        corners = np.array(np.meshgrid(*ends, indexing="ij")).reshape(3, -1)
        world = affine[:3, :3] @ corners + affine[:3, 3:]
        stats[organ] = {"voxels": voxels, "volume_ml": voxels * voxel_ml,
                        "mean_hu": mean_hu, "median_hu": median_hu,
                        "bbox_min_mm": world.min(1).tolist(), "bbox_max_mm": world.max(1).tolist()}
    return stats


def statistics_columns() -> list[str]:
    """The statistics CSV's header: case, then organ_stat, the boxes as _x/_y/_z columns."""
    columns = ["case"]
    for organ in ORGANS:
        for stat in STATISTICS:
            columns += ([f"{organ}_{stat}"] if not stat.startswith("bbox") else
                        [f"{organ}_{stat[:-3]}_{axis}_mm" for axis in "xyz"])
    return columns


def write_statistics_csv(cases: dict[str, dict[str, dict]], path: str | Path) -> Path:
    """path (CSV, a row per case, columns statistics_columns(); absent values empty), atomically."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(statistics_columns())
    for name, organs in cases.items():
        cells: list[str] = [name]
        for organ in ORGANS:
            for stat in STATISTICS:
                v = organs[organ][stat]
                if stat.startswith("bbox"):
                    cells += [""] * 3 if v is None else [repr(float(c)) for c in v]
                else:
                    cells.append("" if v is None else str(v))
        w.writerow(cells)
    text = buf.getvalue()
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))
    return Path(path)
