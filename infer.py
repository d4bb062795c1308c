"""Segment the liver, right kidney, left kidney and spleen in CT scans with a trained VNet.

    python infer.py --input ct.nii.gz --output ct_seg.nii.gz
    python infer.py --input scans/ --output masks/            # every NIfTI in scans/ (and DICOM subfolders)
    python infer.py --input dicom_series/ --output seg.nii.gz  # one DICOM series (a folder of slices)
    python infer.py --input ct.nii.gz --output seg.nii.gz --label ref.nii.gz          # + metrics
    python infer.py --input scans/ --output masks/ --label refs/ --label-map flare22  # refs matched by name
    torchrun --standalone --nproc_per_node=4 infer.py --input scans/ --output masks/  # four GPUs share the scans

Input: a NIfTI file (.nii or .nii.gz, in HU, any orientation, spacing and dtype), a folder of them,
a DICOM series folder (slices ordered by position, rescale slope and intercept applied,
orientation from the headers), or a folder of DICOM series folders.

Output: a uint8 label NIfTI (0 background, 1 liver, 2 right kidney, 3 left kidney, 4 spleen) with
exactly the input's shape (a 4D input with a trailing axis of size 1 included) and affine (sform
and qform), so it lies on the CT in any viewer; for a
folder input, a folder of them named after the inputs (CASE_0000.nii.gz -> CASE.nii.gz). Beside
each mask, a quick-look PNG (axial, coronal, sagittal; --no-png to skip). An existing output is
replaced only with --overwrite.

DICOM SEG (--output-type; highdicom): for a DICOM series input, by default a DICOM Segmentation
beside the NIfTI mask (OUTPUT_STEM.dcm; --output NAME.dcm or --output-type dicom-seg for the SEG
alone, --output-type nifti for none). It references the source series and every slice, holds one
binary segment per organ (segment number = label value) with its SNOMED CT code (DCMQI's and 3D
Slicer's: liver 10200004; kidney 64033007 with the modifier right 24028007 or left 7771000;
spleen 78961009) and the algorithm (abdomen-vnet, the checkpoint's name and hash), and a frame
on each source slice that holds an organ. A NIfTI input has no series to reference: no SEG.

Statistics, for every scan (no reference needed): beside each mask, MASK_STEM_statistics.json with
per organ the voxel count, volume (mL: voxels x the affine's |det|), mean and median HU and the
bounding box in mm (RAS+ world of the mask's affine: metrics.organ_statistics); for a folder,
OUTPUT_FOLDER/statistics.csv with a row per case.

Model: the shipped checkpoints/phantom_small.pt (its card: docs/MODEL_CARD.md), whatever train.py
has written since; --checkpoint FILE, or a run folder for its best.pt. The first line printed
names the model and its card. Its preprocessing (orientation, spacing, intensity normalisation)
is applied on the way in and undone exactly on the way out.

Method: Gaussian-weighted sliding windows on the preprocessed grid (--window: by default the
training patch enlarged to 160 voxels a side, for speed: fewer voxels computed twice; --overlap,
--sw-batch; out of GPU memory, fewer windows per call, then the sums kept on the CPU, with a
warning), softmax probabilities resampled to the input grid and argmaxed slab by slab
(memory bounded for any scan size), then the largest connected component of each organ
(26-connectivity) with the cavities it encloses filled, and for the liver and spleen also the holes
it encloses in two of the three planes through a voxel (a lesion inside an organ is the organ, as
FLARE22, LiTS and IRCAD label it); --no-postprocess keeps the network's argmax as it is. --tta
adds mirrored predictions over the axes the checkpoint was trained mirroring (or --tta-axes), the
kidney channels swapped back for left-right mirrors; a checkpoint trained without mirroring (the
shipped one) refuses --tta alone. Mixed precision on CUDA.

Warnings: a scan too short head to feet to hold the organs (under 100 mm), an organ cut at its
top or bottom edge, or an uncut organ implausibly small (a 2 mL "spleen") is named in one line
"warning: CASE: check the masks: ..." on stderr and in "warnings" of the statistics JSON (and of
the metrics JSON); the exit code stays 0.

Metrics (--label): per organ Dice, precision, recall, volumes (mL), volume difference, HD95 (mm)
and normalised surface Dice at --tolerance mm, in physical spacing (metrics.py documents empty
masks: both empty scores 1 / HD95 0; one empty scores 0 / HD95 inf, null in JSON). A table on
screen and, with a row per case and a mean row, OUTPUT_FOLDER/metrics.csv and .json (a file
output: OUTPUT_STEM_metrics.csv/.json; --metrics PREFIX to choose). The reference uses our label
map unless --label-map names another (dataset.LABEL_MAPS: flare22, totalseg).

Errors (a missing or unreadable input, a 2D image, a wrong or damaged checkpoint, a missing output
folder, a reference of another grid) give one line "error: ..." and exit code 1, with no partial
output. In a folder, a failing case does not stop the others: the summary lists the failures and
the exit code is 1.

Under torchrun (distributed.py), process r of N segments scans r, r + N, ... of a folder on GPU
LOCAL_RANK (or the CPU); rank 0 gathers the results, writes the metrics and prints the summary;
every process exits with 1 when any scan failed.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

import distributed
from utils import (
    LABELS,
    LR_SWAP,
    NUM_CLASSES,
    Preprocessing,
    UserError,
    WindowFallback,
    atomic_write,
    check_writable_folder,
    checkpoint_members,
    configure_torch,
    first_line,
    label_counts,
    load_checkpoint,
    load_nifti,
    mixed_precision_dtype,
    model_from_checkpoint,
    preprocess_image,
    probs_to_input_grid,
    reorient,
    run_cli,
    save_nifti,
    sliding_window_inference,
    spacing_of,
)

ROOT = Path(__file__).resolve().parent
SHIPPED = ROOT / "checkpoints" / "phantom_small.pt"
MODEL_CARD = ROOT / "docs" / "MODEL_CARD.md"
# Default window side (voxels): a window larger than the training patch computes far fewer voxels
# twice over at the same overlap (2.6x fewer than 96^3 windows on a 1.5 mm abdomen), and the network
# is fully convolutional; train.py validates with windows of up to three patches a side too.
MIN_WINDOW = 160
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Two threads per core. oneDNN splits each convolution evenly over the threads; when another process
# takes part of one core, the thread that shares it holds every other back. With twice the threads
# each carries half the share and the scheduler evens them out: beside a busy process on 2 cores
# 10.5-11.3 -> 7.3-7.9 s a scan, quiet 4.9-5.0 s either way (bench/RESULTS.md, "Inference speed").
CPU_THREADS_PER_CORE = 2


def default_threads(local_world: int = 1) -> int:
    """CPU threads when --threads is 0: CPU_THREADS_PER_CORE for each core of this process's share
    (the cores split among local_world processes under torchrun)."""
    return CPU_THREADS_PER_CORE * max(1, (os.cpu_count() or 1) // local_world)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: ...)" to help texts that do not state their default themselves."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from dataset import LABEL_MAPS

    p = argparse.ArgumentParser(description="Segment liver, kidneys and spleen in CT (NIfTI or DICOM).",
                                epilog="The shipped model, checkpoints/phantom_small.pt, is described (intended use, "
                                "evaluation, failure modes) in docs/MODEL_CARD.md.", formatter_class=_HelpFormatter)
    p.add_argument("--input", required=True, help="NIfTI file, folder of NIfTI files, DICOM series folder, "
                   "or folder of DICOM series folders")
    p.add_argument("--output", required=True, help="output .nii.gz for one scan (.dcm: a DICOM SEG alone, for a "
                   "DICOM series), or a folder")
    p.add_argument("--output-type", default="auto", choices=["auto", "nifti", "dicom-seg"],
                   help="auto: the NIfTI mask, plus a DICOM SEG beside it (OUTPUT_STEM.dcm) for a DICOM series input; "
                   "nifti: the NIfTI mask alone; dicom-seg: the DICOM SEG alone (DICOM series inputs only)")
    p.add_argument("--checkpoint", default="", help="checkpoint file, or a train.py run folder (its best.pt) "
                   "(default: the shipped checkpoints/phantom_small.pt, never a newer run)")
    p.add_argument("--label", default="", help="reference label map (file, or folder matched by case name) "
                   "to compute metrics (default: none)")
    p.add_argument("--label-map", default="identity", choices=sorted(LABEL_MAPS),
                   help="label map of the reference")
    p.add_argument("--metrics", default="", help="path prefix of the metrics CSV and JSON (default: "
                   "OUTPUT_FOLDER/metrics, or OUTPUT_STEM_metrics for a file output)")
    p.add_argument("--tolerance", type=float, default=2.0, help="surface Dice tolerance, mm")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap, 0 to <1")
    p.add_argument("--sw-batch", type=int, default=2, help="windows per network call")
    p.add_argument("--window", default="", help="window size in voxels of the preprocessed grid, 'N' or 'X,Y,Z', "
                   f"multiples of 16 (default: the checkpoint's training patch, enlarged to {MIN_WINDOW} a side; "
                   f"never beyond the scan)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation by mirroring (default: off)")
    p.add_argument("--tta-axes", default="", help="canonical axes to mirror with --tta (0 left-right, "
                   "1 anterior-posterior, 2 inferior-superior); all their combinations are run (default: the "
                   "axes the checkpoint was trained mirroring)")
    p.add_argument("--no-postprocess", dest="postprocess", action="store_false",
                   help="keep every connected component and cavity (default: largest component per organ, "
                   "enclosed cavities filled, and the liver's and spleen's holes in two of three planes)")
    p.add_argument("--no-png", dest="png", action="store_false", help="skip the quick-look PNG (default: written)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no mixed precision on CUDA (default: on)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: refuse)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: two per core)")
    p.add_argument("--quiet", action="store_true", help="print only warnings, errors and the failure summary")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Cases


@dataclass
class Case:
    name: str
    source: Path  # NIfTI file or DICOM series folder
    output: Path
    label: Path | None = None
    png: Path | None = None
    statistics: Path | None = None  # the per-case statistics JSON
    nifti: bool = True  # write the NIfTI mask at output
    dicom_seg: Path | None = None  # the DICOM SEG to write (DICOM series inputs)
    error: str = ""  # set when the case cannot run (e.g. its output exists)


def case_name(path: Path) -> str:
    """Scan name without the NIfTI suffix and nnU-Net's channel suffix _0000."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.removesuffix("_0000")


def is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def _find_sources(folder: Path) -> list[Path]:
    from dicom_series import is_dicom_folder

    if is_dicom_folder(folder):
        return [folder]
    niftis = sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith("."))
    series = sorted(p for p in folder.iterdir() if p.is_dir() and is_dicom_folder(p))
    if not niftis and not series:
        raise UserError(f"{folder}: no NIfTI files (.nii, .nii.gz) or DICOM series in this folder; check --input")
    return niftis + series


def collect_cases(args: argparse.Namespace) -> tuple[list[Case], bool]:
    """The scans to segment with their output and reference paths, and whether the input is a
    single scan (a file output) or a batch (a folder output)."""
    from dicom_series import is_dicom_file

    src = Path(args.input)
    if not src.exists():
        raise UserError(f"{src}: no such file or folder; check --input")
    if src.is_file():
        if not is_nifti(src):
            if is_dicom_file(src):
                raise UserError(f"{src}: a single DICOM file; pass the folder that holds the whole series")
            raise UserError(f"{src}: not a NIfTI file (.nii or .nii.gz) or a DICOM series folder; convert it first")
        sources = [src]
    else:
        sources = _find_sources(src)
    single = sources == [src]

    out = Path(args.output)
    seg_only = out.suffix.lower() == ".dcm"
    if seg_only and (not single or src.is_file()):
        raise UserError(f"{out}: a .dcm output is the DICOM SEG of one DICOM series, and {src} is not one; pass a "
                        f"{'folder' if not single else '.nii.gz file'} as --output")
    if seg_only and args.output_type == "nifti":
        raise UserError(f"{out}: a .dcm output with --output-type nifti; name a .nii.gz file as --output")
    if single and (is_nifti(out) or seg_only):
        check_writable_folder(out.parent, out, "--output")
        outputs = [out.with_suffix(".nii.gz")] if seg_only else [out]
        pngs = [outputs[0].with_name(case_name(outputs[0]) + ".png")]
    else:
        if is_nifti(out):
            raise UserError(f"{out}: a file name, but {src} holds {len(sources)} scans; pass a folder as --output")
        if out.exists() and not out.is_dir():
            raise UserError(f"{out}: exists and is not a folder; pass a folder or a .nii.gz file as --output")
        check_writable_folder(out if out.exists() else out.parent, out, "--output")
        names = [case_name(s) for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise UserError(f"{src}: several scans are named {dupes[0]!r} (e.g. .nii and .nii.gz); rename one")
        outputs = [out / f"{n}.nii.gz" for n in names]
        pngs = [out / f"{n}.png" for n in names]

    cases = [Case(case_name(s), s, o, png=p if args.png else None,
                  statistics=o.with_name(case_name(o) + "_statistics.json")) for s, o, p in zip(sources, outputs, pngs)]
    for c in cases:
        if c.output.resolve() == c.source.resolve():
            raise UserError(f"{c.output}: is the input scan itself; choose another --output")
    if args.label:
        attach_references(cases, Path(args.label))
    kind = "dicom-seg" if seg_only else args.output_type
    for c in cases:
        series = c.source.is_dir()
        c.nifti = kind != "dicom-seg"
        c.dicom_seg = c.output.with_name(case_name(c.output) + ".dcm") if series and kind != "nifti" else None
        if not series and kind == "dicom-seg":
            c.error = (f"{c.source}: a NIfTI scan, and a DICOM SEG needs the DICOM series it segments (its UIDs and "
                       f"slice positions): pass the series folder, or drop --output-type dicom-seg")
            continue
        existing = [p for p in (c.output if c.nifti else None, c.dicom_seg, c.statistics) if p and p.exists()]
        if existing and not args.overwrite:
            c.error = f"{existing[0]}: exists; pass --overwrite to replace it"
    return cases, single


def attach_references(cases: list[Case], label: Path) -> None:
    if not label.exists():
        raise UserError(f"{label}: no such reference file or folder; check --label")
    if label.is_file():
        if len(cases) > 1:
            raise UserError(f"{label}: one reference file for {len(cases)} scans; pass a folder of references "
                            f"named like the scans")
        cases[0].label = label
        return
    for c in cases:
        found = [label / f"{n}{s}" for n in (c.name, f"{c.name}_0000") for s in NIFTI_SUFFIXES]
        c.label = next((p for p in found if p.is_file()), None)
        if c.label is None:
            warn(f"{label}: no reference {c.name}.nii.gz for {c.source.name}; no metrics for this case")


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def resolve_checkpoint(text: str) -> Path:
    """--checkpoint -> a checkpoint file: "" is the shipped model (a run of train.py never replaces
    it silently), a folder is a train.py run and gives its best.pt."""
    if not text:
        if not SHIPPED.is_file():
            raise UserError(f"{SHIPPED}: the shipped model is missing; restore it (git checkout {SHIPPED.name}) or "
                            f"pass --checkpoint")
        return SHIPPED
    path = Path(text)
    if path.is_dir():
        if not (path / "best.pt").is_file():
            raise UserError(f"--checkpoint {path}: a folder without best.pt; pass a train.py run folder or a "
                            f"checkpoint file")
        return path / "best.pt"
    return path


@functools.cache
def model_identity(checkpoint: Path) -> tuple[str, str]:
    """(name, version) of a checkpoint for the DICOM SEG's algorithm identification: the file name
    (a run's best.pt as RUN/best.pt) and "sha256:" with the first 16 hex digits of the file's hash."""
    import hashlib

    name = f"{checkpoint.parent.name}/{checkpoint.name}" if checkpoint.name in ("best.pt", "last.pt") else checkpoint.name
    digest = hashlib.sha256()
    with open(checkpoint, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return name, f"sha256:{digest.hexdigest()[:16]}"


def model_card(ckpt: dict, checkpoint: Path) -> str:
    """Where the model's card is: the checkpoint's own "model_card" field, else docs/MODEL_CARD.md
    for the shipped model, else a pointer to the run's record."""
    if ckpt.get("model_card"):
        return str(ckpt["model_card"])
    if checkpoint.resolve() == SHIPPED.resolve():
        return str(MODEL_CARD.relative_to(ROOT))
    return f"none (a train.py run: its train_config and metrics are in {checkpoint.name} and its folder)"


# ---------------------------------------------------------------------------------------------
# Reading


def read_scan(path: Path) -> tuple[np.ndarray, np.ndarray, object]:
    """A CT from a NIfTI file or DICOM series folder -> (HU (X, Y, Z), affine RAS mm, NIfTI header
    or None). The image is checked: 3D, not a single slice, finite values."""
    if path.is_dir():
        from dicom_series import read_dicom_series

        hu, affine = read_dicom_series(path)
        header = None
    else:
        import nibabel as nib

        hu, affine = load_nifti(path, "image")
        header = nib.load(str(path)).header
    if min(hu.shape) < 2:
        raise UserError(f"{path}: shape {hu.shape} is a single slice (a 2D image); a 3D CT volume is needed")
    if hu.dtype == np.bool_ or not np.issubdtype(hu.dtype, np.number):
        raise UserError(f"{path}: voxels of type {hu.dtype} are not CT numbers; pass a CT in HU")
    if np.issubdtype(hu.dtype, np.floating):
        bad = ~np.isfinite(hu)
        if bad.any():
            warn(f"{path}: {int(bad.sum())} NaN or infinite voxels, treated as air (-1024 HU)")
            hu = np.where(bad, np.float32(-1024), hu)
    lo = float(hu.min())
    if lo > -500:
        warn(f"{path}: lowest value {lo:g} does not look like HU (air is -1000); if the scan stores raw values, "
             f"apply its rescale slope and intercept first")
    return hu, affine, header


def read_reference(path: Path, label_map: str, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """A reference label map in our labels on the image's grid. Same voxels stored with axes
    permuted or flipped are reoriented onto the image's; any other grid is an error."""
    from nibabel import orientations as ornt

    from dataset import remap_labels

    ref, ref_affine = load_nifti(path, "reference label map")
    if not np.allclose(ref_affine, affine, atol=1e-3):
        transform = ornt.ornt_transform(ornt.io_orientation(ref_affine), ornt.io_orientation(affine))
        moved, moved_affine = reorient(ref, ref_affine, transform)
        if moved.shape == tuple(shape) and np.allclose(moved_affine, affine, atol=1e-2):
            ref, ref_affine = moved, moved_affine
    if ref.shape != tuple(shape):
        raise UserError(f"{path}: reference shape {ref.shape} differs from the image's {tuple(shape)}; "
                        f"pass the reference of this scan, on its grid")
    if not np.allclose(ref_affine, affine, atol=1e-2):
        raise UserError(f"{path}: the reference's affine differs from the image's (another grid or position); "
                        f"resample the reference onto the image grid")
    return remap_labels(np.ascontiguousarray(ref), label_map, path)


# ---------------------------------------------------------------------------------------------
# Segmentation


def parse_window(text: str) -> tuple[int, int, int] | None:
    if not text:
        return None
    try:
        sides = [int(s) for s in text.split(",")]
    except ValueError:
        raise UserError(f"--window {text}: expected N or X,Y,Z (voxels)") from None
    if len(sides) == 1:
        sides *= 3
    if len(sides) != 3 or any(s <= 0 or s % 16 for s in sides):
        raise UserError(f"--window {text}: needs 1 or 3 positive multiples of 16 (the VNet halves it four times)")
    return tuple(sides)


def trained_mirror_axes(ckpt: dict) -> str:
    """The canonical axes ("0" left-right, "1" anterior-posterior, "2" inferior-superior) the
    checkpoint's training mirrored, from its augmentation record ("" for none or no record)."""
    aug = ckpt.get("augmentation") or {}
    if not aug.get("enabled", True):
        return ""
    return "".join(a for a, key in zip("012", ("flip_lr_prob", "flip_ap_prob", "flip_si_prob"))
                   if (aug.get(key) or 0) > 0)


def mirror_sets(axes: str) -> list[tuple[int, ...]]:
    """Every non-empty combination of the axes in `axes` ("012" -> 7 combinations)."""
    chosen = sorted({int(a) for a in axes if a in "012"})
    if not chosen or len(chosen) != len(set(axes.replace(",", ""))):
        raise UserError(f"--tta-axes {axes}: use digits 0, 1, 2 (e.g. 012 or 0)")
    from itertools import combinations

    return [c for k in range(1, len(chosen) + 1) for c in combinations(chosen, k)]


@dataclass
class Timer:
    times: dict[str, float] = field(default_factory=dict)
    _t: float = field(default_factory=time.perf_counter)

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + now - self._t
        self._t = now


class Segmenter:
    """A checkpoint's VNet and preprocessing, ready to segment scans."""

    def __init__(self, checkpoint: Path, device: torch.device, window: tuple[int, int, int] | None = None,
                 overlap: float = 0.5, sw_batch: int = 2, tta_axes: str | None = None, amp: bool = True):
        """tta_axes: None for no test-time augmentation, "" for the axes the checkpoint was trained
        mirroring, or digits of canonical axes ("012")."""
        ckpt = load_checkpoint(checkpoint)
        # An ensemble's members share a config and a grid; their softmax probabilities are averaged.
        self.models = [model_from_checkpoint(ckpt, checkpoint, i) for i in range(checkpoint_members(ckpt))]
        cfg = self.models[0].cfg
        if cfg.num_classes != NUM_CLASSES or cfg.in_channels != 1:
            raise UserError(f"{checkpoint}: a model with {cfg.in_channels} input channel(s) and {cfg.num_classes} "
                            f"classes; this tool needs CT in, {NUM_CLASSES} classes out: pass a checkpoint of "
                            f"this project's liver/kidneys/spleen model")
        labels = ckpt.get("labels")
        if labels is not None and {int(k): v for k, v in labels.items()} != LABELS:
            raise UserError(f"{checkpoint}: its labels {labels} are not ours {LABELS}; pass a checkpoint of this model")
        try:
            self.prep = Preprocessing.from_dict(ckpt["preprocessing"])
            roi = tuple(int(r) for r in ckpt["roi_size"])
            self.renorm = [member_renormalisation(self.prep, Preprocessing.from_dict(p))
                           for p in ckpt.get("member_preprocessing") or [ckpt["preprocessing"]]]
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{checkpoint}: no valid preprocessing or roi_size ({type(e).__name__}: {e}); "
                            f"use a checkpoint written by train.py") from None
        if not 0 <= overlap < 1:
            raise UserError(f"--overlap {overlap}: must be at least 0 and below 1")
        if sw_batch < 1:
            raise UserError(f"--sw-batch {sw_batch}: must be at least 1")
        self.roi = window or tuple(max(r, MIN_WINDOW) for r in roi)
        self.overlap = overlap
        self.windows = WindowFallback(sw_batch, device, "--sw-batch")
        self.device = device
        trained = trained_mirror_axes(ckpt)
        if tta_axes == "" and not trained:
            # Mirrored passes only help a model that has seen mirrored anatomy (the shipped one has not).
            raise UserError(f"--tta: {checkpoint} records no mirroring in its training, and mirrored passes make "
                            f"such a model worse; drop --tta, or name axes with --tta-axes to run them anyway")
        self.mirrors = [] if tta_axes is None else mirror_sets(tta_axes or trained)
        untrained = sorted({a for m in self.mirrors for a in m} - set(map(int, trained)))
        if untrained:
            warn(f"--tta-axes {tta_axes}: {checkpoint} was not trained mirroring axis {untrained}; a model that "
                 f"knows which way is up and which side is right gets worse from those passes")
        self.amp_dtype = mixed_precision_dtype(device) if amp else None
        if len(self.renorm) != len(self.models):
            raise UserError(f"{checkpoint}: {len(self.models)} ensemble members but {len(self.renorm)} "
                            f"member_preprocessing entries; rebuild it with train.py --ensemble")
        for model in self.models:
            fold_batchnorm(model)
            model.to(device).to(memory_format=torch.channels_last_3d)
        self.checkpoint = checkpoint
        self.card = model_card(ckpt, checkpoint)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """The members' softmax probabilities, averaged; each member sees the window in its own
        intensity normalisation."""
        probs = None
        for model, (scale, shift) in zip(self.models, self.renorm):
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = model(x if (scale, shift) == (1.0, 0.0) else x * scale + shift)
            p = logits.float().softmax(1)
            probs = p if probs is None else probs.add_(p)
        return probs if len(self.models) == 1 else probs.div_(len(self.models))

    def predictor(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, 1, *roi) normalised CT -> (B, C, *roi) float32 softmax probabilities, averaged over
        the mirrored copies with --tta."""
        x = windows.contiguous(memory_format=torch.channels_last_3d)
        probs = self._forward(x)
        for axes in self.mirrors:
            dims = [a + 2 for a in axes]
            p = self._forward(x.flip(dims)).flip(dims)
            if 0 in axes:  # mirrored left-right, the network's right kidney is the patient's left one
                p = p[:, torch.as_tensor(LR_SWAP, dtype=torch.long, device=p.device)]
            probs += p
        return probs.div_(1 + len(self.mirrors)) if self.mirrors else probs

    def window_for(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The window, shrunk along axes the volume is shorter than, to the smallest multiple of 16
        that covers them: fewer padded voxels to compute, same result (one window per such axis,
        whose Gaussian weight cancels in the normalisation)."""
        return tuple(min(r, -(-s // 16) * 16) for r, s in zip(self.roi, shape))

    @torch.inference_mode()
    def _probabilities(self, volume: torch.Tensor) -> torch.Tensor:
        x = volume.to(self.device)[None, None]
        air = (self.prep.clip[0] - self.prep.mean) / self.prep.std
        return sliding_window_inference(x, self.window_for(tuple(volume.shape)), self.windows.sw_batch, self.predictor,
                                         overlap=self.overlap, pad_value=air, out_device=self.windows.out_device)[0]

    def probabilities(self, volume: torch.Tensor) -> torch.Tensor:
        """(X', Y', Z') normalised CT on the preprocessed grid -> (C, X', Y', Z') float32
        probabilities on the model's device (on the CPU once stitching has fallen back there).
        Out of GPU memory, retries with lighter settings (utils.WindowFallback) before giving up."""
        return self.windows.run(lambda: self._probabilities(volume))

    def segment(self, hu: np.ndarray, affine: np.ndarray, postprocess: bool = True, timer: Timer | None = None
                ) -> np.ndarray:
        """CT (X, Y, Z) in HU with its affine -> uint8 label map (X, Y, Z) on the same grid."""
        timer = timer or Timer()
        volume, info = preprocess_image(hu, affine, self.prep)
        timer.lap("preprocess")
        probs = self.probabilities(volume)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        timer.lap("network")
        try:
            with torch.inference_mode():
                labels = probs_to_input_grid(probs, info)
        except torch.OutOfMemoryError:
            labels = None
        if labels is None:  # the slabs at the input's resolution did not fit on the GPU either
            warn(f"out of memory on {self.device} resampling to the input grid; resampling on the CPU (slower)")
            probs = probs.cpu()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            with torch.inference_mode():
                labels = probs_to_input_grid(probs, info)
        del probs
        timer.lap("resample")
        if postprocess:
            keep_largest_components(labels)
            fill_enclosed_holes(labels)
            fill_sectional_holes(labels)
            timer.lap("postprocess")
        return labels


def member_renormalisation(prep: Preprocessing, member: Preprocessing) -> tuple[float, float]:
    """(scale, shift) turning CT normalised with `prep` into CT normalised with `member`'s own
    mean and std (HU), exact since both clip alike: seeds of one recipe may have drawn different
    intensity statistics from their phantoms."""
    if member.clip != prep.clip or member.spacing != prep.spacing or member.orientation != prep.orientation:
        raise ValueError("members differ in grid or clip window")
    return prep.std / member.std, (prep.mean - member.mean) / member.std


def fold_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """In place, for inference in eval mode: each BatchNorm3d that follows a convolution in an
    nn.Sequential is folded into the convolution's weights and bias and replaced by Identity.
    Same function (to float rounding), one pass over the activations fewer per layer."""
    nn = torch.nn
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, bn = seq[i], seq[i + 1]
            if not (isinstance(conv, (nn.Conv3d, nn.ConvTranspose3d)) and isinstance(bn, nn.BatchNorm3d)
                    and bn.running_var is not None and conv.groups == 1):
                continue
            with torch.no_grad():
                scale = torch.rsqrt(bn.running_var + bn.eps)
                shift = -bn.running_mean * scale
                if bn.affine:
                    scale, shift = scale * bn.weight, shift * bn.weight + bn.bias
                out_dim = 1 if isinstance(conv, nn.ConvTranspose3d) else 0
                shape = [1] * conv.weight.ndim
                shape[out_dim] = -1
                conv.weight.mul_(scale.view(shape))
                bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
                conv.bias = nn.Parameter(bias * scale + shift)
            seq[i + 1] = nn.Identity()
    return model


def _organ_regions(labels: np.ndarray) -> Iterator[tuple[int, np.ndarray, bool]]:
    """(value, a writable view of its bounding box, whether the view is transposed) for each organ in
    the map. A Fortran-order map (NIfTI's) is worked through its C-order transpose, 3x faster in scipy."""
    transposed = labels.flags.f_contiguous and not labels.flags.c_contiguous
    view = labels.T if transposed else labels
    for value, box in enumerate(ndimage.find_objects(view, max_label=NUM_CLASSES - 1), start=1):
        if box is not None:
            yield value, view[box], transposed


def keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """In place: each organ keeps only its largest 26-connected component; the rest becomes
    background. Works inside each organ's bounding box, so it costs the organs' size."""
    structure = ndimage.generate_binary_structure(3, 3)
    for value, region, transposed in _organ_regions(labels):
        mask = region == value
        components, n = ndimage.label(mask, structure)
        if n > 1:
            sizes = label_counts(components, n + 1)
            sizes[0] = 0
            largest = np.flatnonzero(sizes == sizes.max())
            if transposed and len(largest) > 1:
                # Equal sizes: keep the one first in the labels' own (X, Y, Z) order, as on a C-order map.
                first = [np.ravel_multi_index(np.nonzero(components == c), components.shape, order="F").min()
                         for c in largest]
                largest = [largest[int(np.argmin(first))]]
            region[mask & (components != largest[0])] = 0
    return labels


def fill_enclosed_holes(labels: np.ndarray) -> np.ndarray:
    """In place: background voxels enclosed in 3D by one organ (a cavity not open to the outside
    through 6-connected non-organ voxels) become that organ. FLARE22, LiTS and IRCAD label a cyst or
    tumour inside an organ as the organ; a lesion the network leaves out is such a cavity. Works
    inside each organ's bounding box; a cavity reaching the box's faces is open."""
    for value, region, _ in _organ_regions(labels):
        components, n = ndimage.label(region != value)
        if n < 2:
            continue
        open_ = _open_components(components, n, (0, 1, 2))
        region[~open_[components] & (region == 0)] = value
    return labels


def _open_components(components: np.ndarray, n: int, axes: tuple[int, ...]) -> np.ndarray:
    """(n + 1,) bool: which of n labelled components (ndimage.label of an organ's box, 0 the organ)
    reach the box's first or last plane along any of axes, the organ counting as reaching them."""
    open_ = np.zeros(n + 1, dtype=bool)
    open_[0] = True
    for axis in axes:
        open_[np.take(components, [0, -1], axis=axis)] = True
    return open_


# Organs whose sectional holes are filled (fill_sectional_holes): liver and spleen. Not the kidneys:
# the reference maps (FLARE22, BTCV) leave out the renal sinus's hilar notch, which is enclosed in
# two of three planes; filling it would cost perfect kidney masks 1 % Dice (0.0009 for the liver,
# whose references leave out the vena cava, and 0 for the spleen).
SECTIONAL_ORGANS = (1, 4)


def fill_sectional_holes(labels: np.ndarray, values: tuple[int, ...] = SECTIONAL_ORGANS, planes: int = 2
                         ) -> np.ndarray:
    """In place: background voxels that one organ of values encloses in at least `planes` of the
    three orthogonal planes through them (a hole of that plane's section, 4-connected) become that
    organ. A lesion the network leaves out is often joined to the outside by a gap a voxel or two
    wide, so it is no 3D cavity (fill_enclosed_holes); its sections still are holes. A vessel
    passing through the organ, such as the vena cava behind the liver, is a hole in one plane only,
    and a notch open to the outside in none. Works inside each organ's bounding box."""
    for value, region, _ in _organ_regions(labels):
        if value not in values:
            continue
        organ = region == value
        enclosed = np.zeros(region.shape, dtype=np.uint8)
        for axis in range(3):
            in_plane = ndimage.generate_binary_structure(3, 1)
            in_plane[(slice(None),) * axis + ([0, 2],)] = False  # no step across planes normal to axis
            components, n = ndimage.label(~organ, in_plane)
            open_ = _open_components(components, n, tuple(a for a in range(3) if a != axis))
            enclosed += ~open_[components]
        region[(enclosed >= planes) & (region == 0)] = value
    return labels


# What a scan must hold for its masks to be trusted (the warnings of coverage_warnings). Liver
# dome to the right kidney's lower pole spans about 200 mm in adults; a scan under 100 mm cannot
# hold the four organs. Below these volumes (mL) an organ that the scan does not cut is implausible
# (the smallest adult organs are several times larger; an atrophic kidney keeps 30-60 mL): likely a
# fragment of something else, such as the 2 mL "spleen" inside the liver dome of a cropped scan.
MIN_EXTENT_MM = 100.0
MIN_ORGAN_ML = {"liver": 200.0, "right_kidney": 15.0, "left_kidney": 15.0, "spleen": 15.0}
MIN_CUT_MM2 = 100.0  # an organ's cross-section in the first or last slice that counts as cut, mm^2


def coverage_warnings(labels: np.ndarray, affine: np.ndarray, volumes: dict[str, float]) -> list[str]:
    """Why a scan's masks may not be trusted: the scan too short head to feet to hold the organs,
    an organ cut at its top or bottom edge (it extends beyond the scan: its mask and volume are
    partial), an uncut organ implausibly small (MIN_ORGAN_ML). labels (X, Y, Z) uint8 on the input
    grid, affine its RAS mm, volumes in mL by organ name. Empty when nothing is suspect."""
    from nibabel.orientations import io_orientation

    orient = io_orientation(affine)
    axis = int(np.flatnonzero(orient[:, 0] == 2)[0])  # the voxel axis nearest head-to-feet
    up = orient[axis, 1] > 0  # higher index is higher in the body
    step = float(np.linalg.norm(affine[:3, axis]))
    found = []
    extent = labels.shape[axis] * step
    if extent < MIN_EXTENT_MM:
        found.append(f"the scan spans only {extent:.0f} mm head to feet (liver, kidneys and spleen span about 200)")
    pixel_mm2 = abs(float(np.linalg.det(affine[:3, :3]))) / step
    cut = set()
    for edge, index in (("top", -1 if up else 0), ("bottom", 0 if up else -1)):
        # A view: np.take would copy the whole map to C order first (30 s on a 512x512x700 map in NIfTI's order).
        edge_slice = labels[(slice(None),) * axis + (index,)]
        area = label_counts(edge_slice) * pixel_mm2
        names = [LABELS[v] for v in range(1, NUM_CLASSES) if area[v] >= MIN_CUT_MM2]
        cut.update(names)
        if names:
            names = [n.replace("_", " ") for n in names]
            listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
            bound = "volumes are lower bounds" if len(names) > 1 else "its volume is a lower bound"
            found.append(f"{listed} cut at the {edge} edge ({bound})")
    for organ, ml in volumes.items():
        if 0 < ml < MIN_ORGAN_ML[organ] and organ not in cut:
            found.append(f"{organ.replace('_', ' ')} {ml:.{0 if ml >= 1 else 1}f} mL: likely spurious")
    return found


# ---------------------------------------------------------------------------------------------


def stored_type(path: Path) -> str:
    """The voxel type a NIfTI file or DICOM series (its first slice) stores, with its scaling:
    "uint16 x1 -1024" (HU = 1 * stored - 1024), "int16"."""
    if path.is_dir():
        import pydicom

        from dicom_series import dicom_files
        from dicom_series import stored_type as dicom_type

        return dicom_type(pydicom.dcmread(dicom_files(path)[0], stop_before_pixels=True))
    import nibabel as nib

    img = nib.load(str(path))  # nibabel moves the header's scaling to the data proxy
    slope, inter = float(getattr(img.dataobj, "slope", 1.0)), float(getattr(img.dataobj, "inter", 0.0))
    scaling = f" x{slope:g} {inter:+g}" if (slope, inter) != (1.0, 0.0) else ""
    return f"{img.get_data_dtype().name}{scaling}"


def describe(shape: tuple[int, ...], affine: np.ndarray, stored: str) -> str:
    """A scan in one line: its shape as stored, the nearest axis codes (with "oblique" when the
    axes are not the world's), voxel spacing (mm) and the stored voxel type."""
    import nibabel as nib

    sp = spacing_of(affine)
    oblique = " oblique" if np.abs(np.asarray(affine)[:3, :3] / sp).max(0).min() < 1 - 1e-4 else ""
    return (f"{'x'.join(map(str, shape))} {''.join(nib.aff2axcodes(affine))}{oblique} "
            f"{'x'.join(f'{s:.2f}' for s in sp)} mm {stored}")


def run_case(case: Case, seg: Segmenter, args: argparse.Namespace) -> dict:
    """Segments one scan and writes its outputs; returns timings (s), organ volumes (mL) and
    metrics (when a reference is given)."""
    from metrics import BBOX_CONVENTION, format_table, organ_metrics, organ_statistics, voxel_volume_ml

    timer = Timer()
    hu, affine, header = read_scan(case.source)
    ref = read_reference(case.label, args.label_map, hu.shape, affine) if case.label else None
    timer.lap("read")
    labels = seg.segment(hu, affine, args.postprocess, timer)
    if header is not None:
        header = header.copy()
        header["cal_min"], header["cal_max"] = 0, 0  # the CT's display range would hide the labels
    if case.dicom_seg is not None:  # built before anything is written: a series unfit for a SEG leaves no output
        from dicom_series import dicom_seg

        dataset = dicom_seg(labels, case.source, *model_identity(seg.checkpoint))
    # A NIfTI stored with trailing axes of size 1 (X, Y, Z, 1) is read 3D; its mask keeps its exact shape.
    shape = header.get_data_shape() if header is not None else labels.shape
    if case.nifti:
        save_nifti(case.output, labels.reshape(shape), affine, header=header)
    if case.dicom_seg is not None:
        atomic_write(case.dicom_seg, lambda tmp: dataset.save_as(tmp, enforce_file_format=True))
    timer.lap("write")
    line = describe(shape, affine, stored_type(case.source))
    if case.png is not None:
        from visualize import save_quicklook

        save_quicklook(case.png, hu, labels, affine, title=f"{case.name}  ({line})")
        timer.lap("png")
    stats = organ_statistics(labels, hu, affine)
    volumes = {organ: round(s["volume_ml"], 1) for organ, s in stats.items()}
    warnings = coverage_warnings(labels, affine, volumes)
    if warnings:
        warn(f"{case.name}: check the masks: {'; '.join(warnings)}")
    written = [str(p) for p in (case.output if case.nifti else None, case.dicom_seg) if p]
    report = {"case": case.name, "scan": str(case.source), "mask": written[0],
              "voxel_volume_ml": voxel_volume_ml(affine), "bbox_convention": BBOX_CONVENTION,
              "organs": stats, "warnings": warnings}
    atomic_write(case.statistics, lambda tmp: tmp.write_text(json.dumps(report, indent=2)))
    result = {"output": written[0], "volumes_ml": volumes, "statistics": stats, "warnings": warnings}
    if case.dicom_seg is not None:
        result["dicom_seg"] = str(case.dicom_seg)
    if ref is not None:
        result["metrics"] = organ_metrics(labels, ref, affine, args.tolerance)
        timer.lap("metrics")
    total = sum(timer.times.values())
    result["timings"] = {**{k: round(v, 3) for k, v in timer.times.items()}, "total": round(total, 3)}
    if not args.quiet:
        steps = ", ".join(f"{k} {v:.1f}" for k, v in timer.times.items())
        organs = ", ".join(f"{k} {v:.0f}" for k, v in volumes.items())
        print(f"{case.name}: {line} -> {' + '.join(written)} in {total:.1f} s ({steps})")
        print(f"  volumes (mL): {organs}")
        if ref is not None:
            print(format_table(result["metrics"], args.tolerance))
    return result


def metrics_prefix(args: argparse.Namespace, cases: list[Case], single: bool) -> Path:
    if args.metrics:
        prefix = Path(args.metrics)
        if not prefix.parent.is_dir():
            raise UserError(f"--metrics {prefix}: the folder {prefix.parent} does not exist; create it first")
        return prefix
    out = cases[0].output
    return out.with_name(case_name(out) + "_metrics") if single else out.parent / "metrics"


def main(args: argparse.Namespace) -> dict:
    """Runs inference on every scan of args.input. Returns {"cases": {name: result}, "failed":
    {name: reason}, "metrics_files": [...]}."""
    t0 = time.perf_counter()
    cases, single = collect_cases(args)
    prefix = None
    if any(c.label for c in cases):
        prefix = metrics_prefix(args, cases, single)
        existing = [p for p in (prefix.with_name(prefix.name + ".csv"), prefix.with_name(prefix.name + ".json"))
                    if p.exists()]
        if existing and not args.overwrite:
            raise UserError(f"{existing[0]}: exists; pass --overwrite to replace it (or --metrics PREFIX)")
    statistics_csv = None if single else cases[0].output.parent / "statistics.csv"
    if statistics_csv is not None and statistics_csv.exists() and not args.overwrite:
        raise UserError(f"{statistics_csv}: exists; pass --overwrite to replace it")
    if single and cases[0].error:
        raise UserError(cases[0].error)
    d = distributed.setup(args.device)
    device = d.device
    # A folder's scans give windows of many shapes: cuDNN would time its algorithms anew for each.
    configure_torch(device, autotune=single)
    torch.set_num_threads(args.threads or default_threads(d.local_world))
    seg = Segmenter(resolve_checkpoint(args.checkpoint), device,
                    parse_window(args.window), args.overlap, args.sw_batch,
                    args.tta_axes if args.tta else None, args.amp)
    cases[0].output.parent.mkdir(exist_ok=True)  # a batch's output folder, made once the model is ready
    if not args.quiet and d.main:
        mirrors = f", TTA {1 + len(seg.mirrors)} passes" if seg.mirrors else ""
        ranks = f" x {d.world} processes" if d.enabled else ""
        members = f", an ensemble of {len(seg.models)}" if len(seg.models) > 1 else ""
        print(f"model {seg.checkpoint}{members} (card: {seg.card})")
        print(f"{device}{ranks}; grid {'x'.join(f'{s:g}' for s in seg.prep.spacing)} mm "
              f"{seg.prep.orientation}; window {'x'.join(map(str, seg.roi))}, overlap {args.overlap}{mirrors}; "
              f"{len(cases)} scan(s)")

    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    for case in cases[d.rank::d.world]:
        if case.error:
            failed[case.name] = case.error
            print(f"error: {case.error}", file=sys.stderr)
            continue
        try:
            results[case.name] = run_case(case, seg, args)
        except UserError as e:
            if single:
                raise
            failed[case.name] = str(e)
            print(f"error: {e}", file=sys.stderr)
        except (MemoryError, torch.OutOfMemoryError) as e:
            reason = (f"{case.source}: out of memory ({type(e).__name__}); try --sw-batch 1, a smaller --window "
                      f"or --device cpu")
            if single:
                raise UserError(reason) from None
            failed[case.name] = reason
            print(f"error: {reason}", file=sys.stderr)
        except Exception as e:  # one broken scan must not stop a batch; a single scan shows the traceback
            if single:
                raise
            failed[case.name] = f"{case.source}: {type(e).__name__}: {first_line(e, 200)}"
            print(f"error: {failed[case.name]}", file=sys.stderr)

    if d.enabled:
        parts = d.gather((results, failed))
        results = {c.name: r[c.name] for c in cases for r, _ in parts if c.name in r}
        failed = {c.name: f[c.name] for c in cases for _, f in parts if c.name in f}
        if not d.main:  # rank 0 writes the metrics and reports; the others share its exit code
            if failed:
                raise SystemExit(1)
            return {"cases": results, "failed": failed, "metrics_files": []}
    summary = {"cases": results, "failed": failed, "metrics_files": []}
    if statistics_csv is not None and results:
        from metrics import write_statistics_csv

        summary["statistics_file"] = str(write_statistics_csv({n: r["statistics"] for n, r in results.items()},
                                                              statistics_csv))
        if not args.quiet:
            print(f"statistics: {statistics_csv} (and CASE_statistics.json beside each mask)")
    scored = {n: r["metrics"] for n, r in results.items() if "metrics" in r}
    if scored and prefix is not None:
        from metrics import format_table, mean_row, write_reports

        files = write_reports(scored, prefix, args.tolerance,
                              {n: r["warnings"] for n, r in results.items() if n in scored and r.get("warnings")})
        summary["metrics_files"] = [str(f) for f in files]
        if not args.quiet:
            if len(scored) > 1:
                print(format_table(mean_row(scored)[0], args.tolerance, f"mean over {len(scored)} cases"))
            print(f"metrics: {files[0]}, {files[1]}")
    if not args.quiet and not single:
        print(f"{len(results)} of {len(cases)} scans segmented in {time.perf_counter() - t0:.1f} s"
              + (f"; {len(failed)} failed:" if failed else ""))
    if failed:
        for name, reason in failed.items():
            print(f"  {name}: {reason}", file=sys.stderr)
        raise UserError(f"{len(failed)} of {len(cases)} scans failed (listed above)")
    return summary


if __name__ == "__main__":
    try:
        run_cli(main, parse_args())
    finally:
        distributed.teardown()
