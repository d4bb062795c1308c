"""Robustness table: a checkpoint on the two real CTs of ../shared/data/real, as given and degraded.

    python bench/bench_robustness.py                                  # the shipped model, every row
    python bench/bench_robustness.py --checkpoint X.pt --rows thick,noise --out /tmp/rob

Rows (each input built from the original NIfTI; the exact recipe is printed and stored with the row):
  original     the scan as given
  thick        5 mm slices: consecutive slices averaged along head-to-feet (IRCAD's 1.6 mm: three, 4.8
               mm; TotalSegmentator's 3 mm: two, 6 mm, as a box centred on a slice); reference: the
               centre slices
  noise        Gaussian noise of 30 HU added (numpy default_rng(0)), rounded to the scan's dtype
  dome         the top 32 mm of the scan only (IRCAD: top 20 slices, the liver dome)
  kidneys_cut  the scan from its top down to halfway along the slices that hold both kidneys, cutting
               them at the lower edge
  mass         a cystic mass pasted into the real scan under the liver, against the right kidney (the
               failure reported on another patient's CT): an ellipsoid of 90 x 80 x 80 mm (left-right,
               front-back, head-feet) centred 40 mm in front of the right kidney's centre, less the four
               organs' reference voxels (it fills the space between them, pressed against them), fluid
               of 10 HU with a 3 mm wall of 45 HU, plus Gaussian noise of 12 HU (default_rng(0), drawn
               over the mass's bounding box),
               labelled background; also scored: the share of the mass painted as an organ
  excretory    the kidneys' collecting systems filled with excreted contrast, as in CT urography: every
               voxel inside the reference kidneys under 100 HU (urine in the calyces and pelvis within the
               kidney's outline, and the sinus fat there) and at least 2 mm from the outline set to 1200 HU,
               plus Gaussian noise of 60 HU (default_rng(0), over the filled voxels' bounding box); labelled kidney,
               as the references label the inside of the outline; also scored: the share of those voxels
               not labelled as their kidney. Only for a scan whose kidneys enhance (reference kidneys' median
               at least 100 HU): in an unenhanced scan urine and parenchyma cannot be told apart by HU, and
               the row is reported as not applicable

Each input is segmented with `python infer.py --input CT --output MASK --label REF --label-map MAP
--checkpoint CKPT --no-png` (in-process) and scored by its metrics; the table gives Dice per organ,
the reference's volume in view (mL) and infer.py's warning, if any (exit code 0 either way). Prints
a markdown table; writes OUT/robustness.json and OUT/robustness.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REAL = ROOT.parent / "shared" / "data" / "real"
SHIPPED = ROOT / "checkpoints" / "phantom_small.pt"
CTS = {  # name: (image, reference, the reference's label map)
    "ircad_p1": ("ircad_p1/image.nii.gz", "ircad_p1/label.nii.gz", "identity"),
    "totalseg_example": ("totalseg_example/ct.nii.gz", "totalseg_example/segmentation.nii.gz", "totalseg"),
}
ROWS = ("original", "thick", "noise", "dome", "kidneys_cut", "mass", "excretory")
THICK_MM = 5.0
NOISE_HU = 30.0
NOISE_SEED = 0
DOME_MM = 32.0
MASS_RADII_MM = (45.0, 40.0, 40.0)  # left-right, front-back, head-feet: 9 x 8 x 8 cm, as in the reported case
MASS_FORWARD_MM = 40.0  # its centre in front of the right kidney's centre: the hepatorenal space, under the liver
MASS_HU, MASS_WALL_HU, MASS_WALL_MM, MASS_NOISE_HU = 10.0, 45.0, 3.0, 12.0
# Excreted contrast reaches 300 to over 2000 HU in the collecting system (docs/phantom.md, "Calibration").
URINE_UNDER_HU = 100.0  # inside an enhanced kidney's outline, what is darker than this is urine or sinus fat
ENHANCED_KIDNEY_HU = 100.0  # the reference kidneys' median HU from which the excretory row applies
EXCRETORY_DEPTH_MM, EXCRETORY_HU, EXCRETORY_NOISE_HU = 2.0, 1200.0, 60.0
ORGANS = ("liver", "right_kidney", "left_kidney", "spleen")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", default=str(SHIPPED), help="checkpoint to score")
    p.add_argument("--real", default=str(REAL), help="folder of the real CTs")
    p.add_argument("--cts", default=",".join(CTS), help="CTs to use, comma-separated")
    p.add_argument("--rows", default=",".join(ROWS), help="rows to build, comma-separated")
    p.add_argument("--out", default="", help="folder for inputs, masks and the table (default: a new temporary one)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda")
    return p.parse_args(argv)


@lru_cache(maxsize=2)
def load_ct(name: str, real: str = str(REAL)) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(hu (X, Y, Z) as stored, reference label map as stored, affine, label map name) of CTS[name]."""
    import nibabel as nib

    image, ref, label_map = CTS[name]
    ct, lab = nib.load(Path(real) / image), nib.load(Path(real) / ref)
    return np.asanyarray(ct.dataobj), np.asanyarray(lab.dataobj), ct.affine, label_map


def head_to_feet_axis(affine: np.ndarray) -> tuple[int, bool]:
    """The voxel axis nearest head-to-feet, and whether its index grows towards the head."""
    from nibabel.orientations import io_orientation

    orient = io_orientation(affine)
    axis = int(np.flatnonzero(orient[:, 0] == 2)[0])
    return axis, bool(orient[axis, 1] > 0)


def take(array: np.ndarray, axis: int, index) -> np.ndarray:
    return np.ascontiguousarray(np.take(array, index, axis=axis))


def moved_affine(affine: np.ndarray, axis: int, first: int, step: int = 1) -> np.ndarray:
    """The affine of slices first, first + step, ... of `axis`."""
    out = affine.copy()
    out[:3, 3] += affine[:3, axis] * first
    out[:3, axis] *= step
    return out


def build_input(row: str, hu: np.ndarray, label: np.ndarray, affine: np.ndarray, label_map: str = "identity"
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """One row's input from a CT (hu, HU, any dtype), its reference (as stored, in `label_map`) and
    affine: (hu, reference, affine, recipe), the recipe in words precise enough to rebuild it."""
    axis, up = head_to_feet_axis(affine)
    n = hu.shape[axis]
    dz = float(np.linalg.norm(affine[:3, axis]))
    if row == "original":
        return hu, label, affine, "the scan as given"
    if row == "thick":
        k = max(2, round(THICK_MM / dz))
        # A box k slices wide centred on a slice: k odd, k slices; k even, k + 1 with half weight at both ends.
        taps = np.ones(k) if k % 2 else np.r_[0.5, np.ones(k - 1), 0.5]
        half = len(taps) // 2
        centres = np.arange(half, n - half, k)
        moved = np.moveaxis(hu.astype(np.float32), axis, 0)
        thick = sum(w * moved[centres - half + t] for t, w in enumerate(taps / k))
        thick = np.moveaxis(np.round(thick), 0, axis).astype(hu.dtype)
        recipe = (f"slices of axis {axis} averaged {k} at a time ({k * dz:.1f} mm; weights {np.round(taps / k, 3).tolist()}"
                  f" over slices c-{half}..c+{half}) for c = {centres[0]}, {centres[0] + k}, ..., {centres[-1]} "
                  f"({len(centres)} slices); reference: slices c; affine origin at slice {centres[0]}, step x{k}")
        return (np.ascontiguousarray(thick), take(label, axis, centres),
                moved_affine(affine, axis, int(centres[0]), k), recipe)
    if row == "noise":
        rng = np.random.default_rng(NOISE_SEED)
        noisy = hu.astype(np.float32) + rng.normal(0.0, NOISE_HU, hu.shape).astype(np.float32)
        info = np.iinfo(hu.dtype) if np.issubdtype(hu.dtype, np.integer) else None
        noisy = np.clip(np.round(noisy), info.min, info.max) if info else noisy
        recipe = (f"hu + numpy.random.default_rng({NOISE_SEED}).normal(0, {NOISE_HU:g}, shape) (float32), rounded "
                  f"and cast back to {hu.dtype}")
        return noisy.astype(hu.dtype), label, affine, recipe
    if row == "dome":
        keep = round(DOME_MM / dz)
        first = n - keep if up else 0
        recipe = (f"slices {first}:{first + keep} of axis {axis} (the top {keep}, {keep * dz:.0f} mm, of {n}); "
                  f"affine origin moved to slice {first}")
    elif row == "kidneys_cut":
        from dataset import remap_labels

        ours = remap_labels(np.asarray(label), label_map, "reference")
        others = tuple(a for a in range(3) if a != axis)
        spans = [np.flatnonzero((ours == v).any(axis=others)) for v in (2, 3)]
        lo, hi = max(s.min() for s in spans), min(s.max() for s in spans)  # the slices holding both kidneys
        cut = (int(lo) + int(hi)) // 2
        first, keep = (cut, n - cut) if up else (0, cut + 1)
        recipe = (f"slices {first}:{first + keep} of axis {axis} ({keep * dz:.0f} mm of {n * dz:.0f}): from the top "
                  f"down to slice {cut}, halfway along the slices holding both kidneys (reference: right kidney "
                  f"{spans[0].min()}-{spans[0].max()}, left {spans[1].min()}-{spans[1].max()}); affine origin moved to "
                  f"slice {first}")
    elif row == "mass":
        hu, recipe = paste_mass(hu, label, affine, label_map)
        return hu, label, affine, recipe
    elif row == "excretory":
        hu, recipe = fill_collecting_systems(hu, label, affine, label_map)
        return hu, label, affine, recipe
    else:
        raise ValueError(f"unknown row {row!r}; rows: {', '.join(ROWS)}")
    index = np.arange(first, first + keep)
    return take(hu, axis, index), take(label, axis, index), moved_affine(affine, axis, first), recipe


def mass_mask(label: np.ndarray, affine: np.ndarray, label_map: str = "identity") -> np.ndarray:
    """(X, Y, Z) bool: the mass row's cyst (MASS_RADII_MM ellipsoid, MASS_FORWARD_MM in front of the
    right kidney's centre, in the scan's RAS world) less the four organs of the reference."""
    from dataset import remap_labels

    ours = remap_labels(np.asarray(label), label_map, "reference")
    kidney = np.argwhere(ours == 2)
    centre = affine[:3, :3] @ kidney.mean(0) + affine[:3, 3] + np.array([0.0, MASS_FORWARD_MM, 0.0])
    # The ellipsoid's box in voxels, then world coordinates of those voxels only.
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * MASS_RADII_MM + centre
    inv = np.linalg.inv(affine)
    vox = corners @ inv[:3, :3].T + inv[:3, 3]
    lo = np.clip(np.floor(vox.min(0)).astype(int), 0, np.array(label.shape) - 1)
    hi = np.clip(np.ceil(vox.max(0)).astype(int) + 1, 1, np.array(label.shape))
    idx = np.stack(np.meshgrid(*[np.arange(a, b) for a, b in zip(lo, hi)], indexing="ij"), -1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    inside = (((world - centre) / np.array(MASS_RADII_MM)) ** 2).sum(-1) <= 1
    mask = np.zeros(label.shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = inside
    return mask & (ours == 0)


def paste_mass(hu: np.ndarray, label: np.ndarray, affine: np.ndarray, label_map: str = "identity"
               ) -> tuple[np.ndarray, str]:
    """The mass row's scan: hu (same dtype) with the cyst of mass_mask painted in, and its recipe."""
    from scipy import ndimage

    from utils import spacing_of

    mask = mass_mask(label, affine, label_map)
    box = tuple(slice(max(b.start - 1, 0), b.stop + 1) for b in ndimage.find_objects(mask.astype(np.uint8))[0])
    depth = ndimage.distance_transform_edt(np.pad(mask[box], 1), sampling=spacing_of(affine))[1:-1, 1:-1, 1:-1]
    painted = np.where(depth <= MASS_WALL_MM, MASS_WALL_HU, MASS_HU).astype(np.float32)
    painted += np.random.default_rng(NOISE_SEED).normal(0.0, MASS_NOISE_HU, painted.shape).astype(np.float32)
    out = np.array(hu, copy=True)
    out[box][mask[box]] = np.round(painted[mask[box]]).astype(hu.dtype)
    ml = mask.sum() * abs(float(np.linalg.det(affine[:3, :3]))) / 1000
    recipe = (f"an ellipsoid of radii {MASS_RADII_MM} mm (RAS) centred {MASS_FORWARD_MM:g} mm in front of the reference "
              f"right kidney's centre, less the reference organs ({ml:.0f} mL): {MASS_HU:g} HU, within "
              f"{MASS_WALL_MM:g} mm of its surface {MASS_WALL_HU:g} HU, + default_rng({NOISE_SEED}).normal(0, "
              f"{MASS_NOISE_HU:g}) over the mask's bounding box (1 voxel margin), rounded to {hu.dtype}; labelled background")
    return out, recipe


class RowNotApplicable(ValueError):
    """A row that a CT cannot be given (the excretory row on an unenhanced scan)."""


def collecting_systems(hu: np.ndarray, label: np.ndarray, affine: np.ndarray, label_map: str = "identity"
                       ) -> np.ndarray:
    """(X, Y, Z) uint8: the excretory row's collecting systems, 2 (right) and 3 (left) where a reference
    kidney's voxel is under URINE_UNDER_HU and at least EXCRETORY_DEPTH_MM inside its outline, else 0.
    Raises RowNotApplicable when the reference kidneys' median is under ENHANCED_KIDNEY_HU."""
    from scipy import ndimage

    from dataset import remap_labels
    from utils import spacing_of

    ours = remap_labels(np.asarray(label), label_map, "reference")
    kidneys = (ours == 2) | (ours == 3)
    median = float(np.median(np.asarray(hu)[kidneys]))
    if median < ENHANCED_KIDNEY_HU:
        raise RowNotApplicable(f"the kidneys do not enhance (median {median:.0f} HU, under {ENHANCED_KIDNEY_HU:g}): "
                               "urine and parenchyma cannot be told apart by HU")
    out = np.zeros(ours.shape, dtype=np.uint8)
    for value in (2, 3):
        box = ndimage.find_objects((ours == value).astype(np.uint8))[0]
        kidney = ours[box] == value
        depth = ndimage.distance_transform_edt(np.pad(kidney, 1), sampling=spacing_of(affine))[1:-1, 1:-1, 1:-1]
        out[box][kidney & (depth >= EXCRETORY_DEPTH_MM) & (np.asarray(hu)[box] < URINE_UNDER_HU)] = value
    return out


def fill_collecting_systems(hu: np.ndarray, label: np.ndarray, affine: np.ndarray, label_map: str = "identity"
                            ) -> tuple[np.ndarray, str]:
    """The excretory row's scan: hu (same dtype) with the voxels of collecting_systems at EXCRETORY_HU plus
    noise, and its recipe."""
    from scipy import ndimage

    systems = collecting_systems(hu, label, affine, label_map) > 0
    box = ndimage.find_objects(systems.astype(np.uint8))[0]
    painted = EXCRETORY_HU + np.random.default_rng(NOISE_SEED).normal(0.0, EXCRETORY_NOISE_HU, systems[box].shape)
    out = np.array(hu, copy=True)
    out[box][systems[box]] = np.round(painted[systems[box]]).astype(hu.dtype)
    ml = systems.sum() * abs(float(np.linalg.det(affine[:3, :3]))) / 1000
    recipe = (f"every reference kidney voxel under {URINE_UNDER_HU:g} HU and at least {EXCRETORY_DEPTH_MM:g} mm inside "
              f"its kidney's outline ({ml:.1f} mL) set to {EXCRETORY_HU:g} HU + default_rng({NOISE_SEED}).normal(0, "
              f"{EXCRETORY_NOISE_HU:g}) over their bounding box, rounded to {hu.dtype}; labelled kidney")
    return out, recipe


def run_row(ct: str, row: str, checkpoint: str | Path, folder: Path, real: str = str(REAL),
            device: str = "auto") -> dict:
    """Builds the row's input in `folder`, segments it with infer.py and scores it: {"ct", "row",
    "recipe", "shape", "image", "mask", "dice": {organ: Dice}, "ref_ml": {organ: mL in view},
    "pred_ml", "warnings"}."""
    import nibabel as nib

    import infer
    from dataset import remap_labels

    hu, label, affine, label_map = load_ct(ct, real)
    hu, label, affine, recipe = build_input(row, hu, label, affine, label_map)
    folder.mkdir(parents=True, exist_ok=True)
    image, ref, mask = folder / f"{ct}_{row}.nii.gz", folder / f"{ct}_{row}_ref.nii.gz", folder / f"{ct}_{row}_seg.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), image)
    nib.save(nib.Nifti1Image(label, affine), ref)
    summary = infer.main(infer.parse_args(["--input", str(image), "--output", str(mask), "--label", str(ref),
                                           "--label-map", label_map, "--checkpoint", str(checkpoint), "--no-png",
                                           "--quiet", "--overwrite", "--device", device,
                                           "--metrics", str(folder / f"{ct}_{row}_metrics")]))
    (result,) = summary["cases"].values()
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000
    counts = np.bincount(remap_labels(np.asarray(label), label_map, ref).ravel(), minlength=5)
    painted = missed = None
    if row == "mass":  # the share of the cyst the model calls an organ, %
        cyst = mass_mask(label, affine, label_map)
        painted = round(100.0 * float((np.asarray(nib.load(mask).dataobj)[cyst] > 0).mean()), 1)
    if row == "excretory":  # the share of the opacified voxels not labelled as their own kidney, %
        systems = collecting_systems(load_ct(ct, real)[0], label, affine, label_map)
        missed = round(100.0 * float((np.asarray(nib.load(mask).dataobj)[systems > 0] != systems[systems > 0]).mean()), 1)
    return {"ct": ct, "row": row, "recipe": recipe, "shape": list(hu.shape), "image": str(image), "mask": str(mask),
            "mass_painted_percent": painted, "collecting_missed_percent": missed,
            "dice": {o: round(result["metrics"][o]["dice"], 3) for o in ORGANS},
            "ref_ml": {o: round(float(counts[i + 1]) * voxel_ml, 1) for i, o in enumerate(ORGANS)},
            "pred_ml": result["volumes_ml"], "warnings": result["warnings"]}


def markdown(rows: list[dict], checkpoint: str) -> str:
    lines = [f"Checkpoint `{checkpoint}`. Dice per organ (reference volume in view, mL); warning: infer.py's.", "",
             "| CT | input | liver | right kidney | left kidney | spleen | warning |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("not_applicable"):
            lines.append(f"| {r['ct']} | {r['row']} | not applicable: {r['not_applicable']} |  |  |  |  |")
            continue
        cells = [f"{r['dice'][o]:.3f} ({r['ref_ml'][o]:.0f})" for o in ORGANS]
        row = r["row"] + (f" ({r['mass_painted_percent']:.1f} % of it painted as organ)"
                          if r.get("mass_painted_percent") is not None else "")
        row += (f" ({r['collecting_missed_percent']:.1f} % of the opacified voxels missed)"
                if r.get("collecting_missed_percent") is not None else "")
        lines.append(f"| {r['ct']} | {row} | {' | '.join(cells)} | {'; '.join(r['warnings']) or '-'} |")
    lines += ["", "Inputs:"] + [f"- {r['ct']} {r['row']}: {r['recipe']}" for r in rows
                                    if r["row"] != "original" and not r.get("not_applicable")]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> list[dict]:
    out = Path(args.out or tempfile.mkdtemp(prefix="robustness-"))
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for ct in args.cts.split(","):
        for row in args.rows.split(","):
            try:
                r = run_row(ct, row, args.checkpoint, out / "inputs", args.real, args.device)
            except RowNotApplicable as e:
                print(f"{ct} {row}: not applicable: {e}", flush=True)
                rows.append({"ct": ct, "row": row, "not_applicable": str(e)})
                continue
            print(f"{ct} {row}: Dice {r['dice']}; warning: {'; '.join(r['warnings']) or '-'}\n  input: {r['recipe']}",
                  flush=True)
            rows.append(r)
    text = markdown(rows, args.checkpoint)
    (out / "robustness.md").write_text(text)
    (out / "robustness.json").write_text(json.dumps({"checkpoint": args.checkpoint, "rows": rows}, indent=2))
    print("\n" + text + f"\nwritten: {out / 'robustness.md'}, {out / 'robustness.json'}")
    return rows


if __name__ == "__main__":
    main(parse_args())
