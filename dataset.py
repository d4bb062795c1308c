"""Datasets: finding image/label pairs, remapping labels, preprocessing to the training grid, and
sampling augmented patches.

Volumes live in canonical RAS orientation at the training spacing: axis 0 runs from the
patient's left to right, axis 1 posterior to anterior, axis 2 inferior to superior.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from utils import (
    LABELS,
    LR_SWAP,
    NUM_CLASSES,
    Preprocessing,
    UserError,
    load_nifti,
    preprocess_image,
    preprocess_label,
)

# Source label value -> ours (0 background, 1 liver, 2 right kidney, 3 left kidney, 4 spleen).
# Values not listed are other organs and become background; a value outside `allowed` is an error.
LABEL_MAPS: dict[str, dict[int, int]] = {
    "identity": {0: 0, 1: 1, 2: 2, 3: 3, 4: 4},
    # FLARE22: 1 liver, 2 right kidney, 3 spleen, 13 left kidney; 4-12 other abdominal organs.
    "flare22": {1: 1, 2: 2, 3: 4, 13: 3},
    # TotalSegmentator (v1 and v2 agree on these): 1 spleen, 2 right kidney, 3 left kidney, 5 liver.
    "totalseg": {1: 4, 2: 2, 3: 3, 5: 1},
}
ALLOWED_VALUES: dict[str, set[int]] = {
    "identity": set(range(5)),
    "flare22": set(range(14)),
    "totalseg": set(range(118)),
}


def remap_labels(label: np.ndarray, name: str, path: Path | str = "label") -> np.ndarray:
    """Source label map -> ours (uint8). Values the map does not know raise a UserError."""
    if name not in LABEL_MAPS:
        raise UserError(f"unknown label map {name!r}: choose from {sorted(LABEL_MAPS)}")
    values = np.unique(label)
    if np.issubdtype(values.dtype, np.floating):
        if not np.all(np.isfinite(values)) or not np.all(values == np.round(values)):
            raise UserError(f"{path}: label values are not whole numbers (e.g. {values[:5]}); "
                            f"is this an image rather than a label map?")
    unknown = sorted(set(int(v) for v in values) - ALLOWED_VALUES[name] - {0})
    if unknown:
        raise UserError(f"{path}: label values {unknown[:8]} are not in the {name!r} label map "
                        f"(allowed {sorted(ALLOWED_VALUES[name])}); pass the right --label-map")
    lut = np.zeros(int(values.max()) + 1, dtype=np.uint8)
    for src, dst in LABEL_MAPS[name].items():
        if src < lut.size:
            lut[src] = dst
    return lut[label.astype(np.int64)]


@dataclass
class CasePaths:
    name: str
    image: Path
    label: Path | None


def find_cases(root: str | Path) -> list[CasePaths]:
    """Image/label pairs in an nnU-Net-style folder: imagesTr/CASE_0000.nii.gz with
    labelsTr/CASE.nii.gz. Errors name the folder and what is missing."""
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: no such folder; pass --data with a dataset folder "
                        f"(imagesTr/ + labelsTr/)")
    if not root.is_dir():
        raise UserError(f"{root}: not a folder; pass --data with a dataset folder (imagesTr/ + labelsTr/)")
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise UserError(f"{root}: no imagesTr/ folder; expected imagesTr/CASE_0000.nii.gz and labelsTr/CASE.nii.gz")
    images = sorted(p for p in images_dir.iterdir() if p.name.endswith((".nii.gz", ".nii")))
    if not images:
        raise UserError(f"{images_dir}: no .nii.gz images; expected imagesTr/CASE_0000.nii.gz")
    cases = []
    for image in images:
        stem = image.name.removesuffix(".gz").removesuffix(".nii")
        name = stem.removesuffix("_0000")
        label = next((p for p in (labels_dir / f"{name}.nii.gz", labels_dir / f"{name}.nii") if p.exists()), None)
        if label is None:
            raise UserError(f"{image}: no label {labels_dir / (name + '.nii.gz')}; add it or remove the image")
        cases.append(CasePaths(name, image, label))
    return cases


def detect_label_map(root: str | Path) -> str:
    """The label map named by dataset.json's labels when they are ours; identity otherwise."""
    meta = Path(root) / "dataset.json"
    if meta.exists():
        try:
            labels = json.loads(meta.read_text()).get("labels", {})
        except json.JSONDecodeError as e:
            raise UserError(f"{meta}: not valid JSON ({e.msg} at line {e.lineno}); fix or remove it") from None
        names = {str(k).lower(): v for k, v in labels.items()}
        if names.get("liver") == 1 and names.get("spleen") == 3 and names.get("left_kidney", names.get("kidney_left")) == 13:
            return "flare22"
    return "identity"


@dataclass
class Volume:
    """One preprocessed case: image (X, Y, Z) float32 in clipped HU and label (X, Y, Z) uint8, on
    the canonical training grid."""

    name: str
    image: np.ndarray
    label: np.ndarray


def load_case(case: CasePaths, prep: Preprocessing, label_map: str) -> Volume:
    """Reads, checks, reorients and resamples one pair to prep's grid."""
    hu, affine = load_nifti(case.image, "image")
    if not np.issubdtype(hu.dtype, np.integer) and not np.all(np.isfinite(hu)):
        raise UserError(f"{case.image}: the image holds NaN or infinite voxels; fix or drop this case")
    label, lab_affine = load_nifti(case.label, "label")
    if label.shape != hu.shape:
        raise UserError(f"{case.label}: label shape {label.shape} differs from image shape {hu.shape} "
                        f"({case.image.name}); they must be on one grid")
    if not np.allclose(affine, lab_affine, atol=1e-3, rtol=1e-4):
        raise UserError(f"{case.label}: label affine differs from the image's ({case.image.name}); "
                        f"resample the label onto the image grid")
    label = remap_labels(label, label_map, case.label)
    image, info = preprocess_image(hu, affine, prep, normalize=False)
    image = image.clamp(*prep.clip).numpy()
    label = preprocess_label(label, info)
    box = body_box(image, label, prep.clip[0] + 50.0)
    return Volume(case.name, np.ascontiguousarray(image[box]), np.ascontiguousarray(label[box]))


def body_box(image: np.ndarray, label: np.ndarray, hu: float, margin: int = 4
             ) -> tuple[slice, slice, slice]:
    """Bounding box of the body (voxels above hu, and all labels) plus a margin: the air around a
    patient carries no training signal and costs a third or more of every validation pass."""
    inside = (image > hu) | (label > 0)
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(inside.any(axis=other))
        if idx.size == 0:
            return (slice(None),) * 3
        box.append(slice(max(0, idx[0] - margin), min(image.shape[axis], idx[-1] + 1 + margin)))
    return tuple(box)


def intensity_stats(volumes: list[Volume], clip: tuple[float, float], max_voxels: int = 2_000_000
                    ) -> tuple[float, float]:
    """Mean and std (HU) of organ voxels after clipping, as nnU-Net normalises CT: the statistics
    of the tissue that matters, independent of how much air a field of view holds."""
    rng = np.random.default_rng(0)
    samples = []
    per_case = max(1, max_voxels // max(1, len(volumes)))
    for v in volumes:
        fg = v.image[v.label > 0]
        if fg.size > per_case:
            fg = rng.choice(fg, per_case, replace=False)
        samples.append(np.clip(fg, *clip))
    values = np.concatenate(samples) if samples else np.zeros(1)
    if values.size < 100:
        raise UserError("the training labels hold almost no organ voxels; check the label map (--label-map)")
    return float(values.mean()), float(max(values.std(), 1.0))


# ---------------------------------------------------------------------------------------------
# Patches and augmentation


@dataclass
class AugmentConfig:
    rotate_deg: float = 15.0  # max rotation about each axis
    rotate_prob: float = 0.5  # chance a patch is rotated
    scale: tuple[float, float] = (0.85, 1.15)  # isotropic zoom range
    scale_prob: float = 0.5
    # Mirroring is off by default: anatomy is not mirror-symmetric. The side of the liver is what
    # tells a right kidney from a left one, so a left-right mirror (labels swapped, as it must)
    # shows the network situs inversus and makes kidney side ambiguous. Set for symmetric tasks.
    flip_lr_prob: float = 0.0  # left-right mirror; swaps the kidney labels
    flip_ap_prob: float = 0.0  # anterior-posterior mirror
    flip_si_prob: float = 0.0  # superior-inferior mirror
    intensity_scale: tuple[float, float] = (0.9, 1.1)  # multiplies normalised intensities
    intensity_shift: float = 0.1  # max additive shift, in standard deviations
    intensity_prob: float = 0.5
    gamma: tuple[float, float] = (0.7, 1.5)
    gamma_prob: float = 0.3
    noise_std: float = 0.1  # max Gaussian noise std, in standard deviations
    noise_prob: float = 0.2
    enabled: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def _rotation_matrix(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def spatial_matrix(rng: np.random.Generator, aug: AugmentConfig) -> tuple[np.ndarray, bool]:
    """3x3 map from output to input patch coordinates (array axis order), and whether it mirrors
    left-right (axis 0)."""
    m = np.eye(3)
    if aug.enabled and rng.random() < aug.rotate_prob:
        m = _rotation_matrix(np.radians(rng.uniform(-aug.rotate_deg, aug.rotate_deg, 3))) @ m
    if aug.enabled and rng.random() < aug.scale_prob:
        m = m * rng.uniform(*aug.scale)
    flips = np.ones(3)
    if aug.enabled:
        for axis, prob in enumerate((aug.flip_lr_prob, aug.flip_ap_prob, aug.flip_si_prob)):
            if rng.random() < prob:
                flips[axis] = -1
    return m @ np.diag(flips), bool(flips[0] < 0)


def warp_patch(image: torch.Tensor, label: torch.Tensor, matrix: np.ndarray, mirrored_lr: bool,
               out_size: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resamples a crop around its centre: image (C, X, Y, Z) float trilinear, label (X, Y, Z) int
    nearest, output voxel o taken from input position centre + matrix @ (o - centre_out). A
    left-right mirror swaps the kidney labels, so labels keep naming the patient's side."""
    crop = image.shape[1:]
    # affine_grid works in normalised (-1..1) coordinates with the axes reversed (W, H, D).
    theta_xyz = np.diag(1.0 / np.array(crop, dtype=np.float64)) @ matrix @ np.diag(np.array(out_size, dtype=np.float64))
    rev = theta_xyz[::-1, ::-1]
    theta = torch.zeros(1, 3, 4, dtype=torch.float32)
    theta[0, :, :3] = torch.from_numpy(rev.copy())
    grid = F.affine_grid(theta, [1, 1, *out_size], align_corners=False)
    img = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    lab = F.grid_sample(label[None, None].float(), grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)[0, 0].to(torch.uint8)
    if mirrored_lr:
        lab = torch.from_numpy(LR_SWAP)[lab.long()]
    return img, lab


def augment_intensity(image: torch.Tensor, rng: np.random.Generator, aug: AugmentConfig) -> torch.Tensor:
    """Contrast and scanner variation on a normalised patch: scale/shift, gamma, noise."""
    if not aug.enabled:
        return image
    if rng.random() < aug.intensity_prob:
        image = image * rng.uniform(*aug.intensity_scale) + rng.uniform(-aug.intensity_shift, aug.intensity_shift)
    if rng.random() < aug.gamma_prob:
        lo, hi = image.min(), image.max()
        span = (hi - lo).clamp(min=1e-6)
        image = ((image - lo) / span) ** rng.uniform(*aug.gamma) * span + lo
    if rng.random() < aug.noise_prob:
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        image = image + torch.randn(image.shape, generator=gen) * rng.uniform(0, aug.noise_std)
    return image


def crop_padded(array: np.ndarray, center: np.ndarray, size: tuple[int, int, int], fill: float) -> np.ndarray:
    """The size-shaped block of array centred at center, filled with fill outside the array."""
    out = np.full(size, fill, dtype=array.dtype)
    start = np.asarray(center) - np.asarray(size) // 2
    src, dst = [], []
    for s, n, length in zip(start, size, array.shape):
        a, b = max(s, 0), min(s + n, length)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    out[tuple(dst)] = array[tuple(src)]
    return out


class PatchDataset(Dataset):
    """Random augmented patches from preprocessed volumes.

    Item i of epoch e depends only on (seed, e, i), so runs are reproducible with any number of
    DataLoader workers and a resumed run draws what an uninterrupted one would.
    Returns image (1, *patch) float32 (normalised) and label (*patch) int64.
    """

    def __init__(self, volumes: list[Volume], prep: Preprocessing, patch_size: tuple[int, int, int],
                 samples_per_epoch: int, aug: AugmentConfig, seed: int = 0, foreground_prob: float = 0.67):
        self.volumes = volumes
        self.prep = prep
        self.patch = tuple(int(p) for p in patch_size)
        self.samples = samples_per_epoch
        self.aug = aug
        self.seed = seed
        self.fg_prob = foreground_prob
        self.epoch = 0
        self.air = (prep.clip[0] - prep.mean) / prep.std
        rng = np.random.default_rng(seed)
        # Foreground oversampling: up to 20k voxel positions per organ per case to centre on, so
        # small organs (kidneys, spleen) are seen as often as the liver.
        self.organ_voxels: list[dict[int, np.ndarray]] = []
        for v in volumes:
            per = {}
            for c in range(1, NUM_CLASSES):
                idx = np.argwhere(v.label == c)
                if len(idx) > 20000:
                    idx = idx[rng.choice(len(idx), 20000, replace=False)]
                if len(idx):
                    per[c] = idx.astype(np.int32)
            self.organ_voxels.append(per)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        k = int(rng.integers(len(self.volumes)))
        vol, organs = self.volumes[k], self.organ_voxels[k]
        if organs and rng.random() < self.fg_prob:
            cls = list(organs)[int(rng.integers(len(organs)))]
            center = organs[cls][int(rng.integers(len(organs[cls])))]
        else:
            center = np.array([rng.integers(0, s) for s in vol.image.shape])
        matrix, mirrored = spatial_matrix(rng, self.aug)
        if np.allclose(matrix, np.eye(3)):
            crop = self.patch
        else:
            # Large enough to hold the rotated, zoomed patch: half-diagonal times the zoom.
            reach = np.abs(matrix) @ np.array(self.patch, dtype=np.float64)
            crop = tuple(int(math.ceil(r)) + 2 for r in reach)
        img = crop_padded(vol.image, center, crop, self.prep.clip[0])
        lab = crop_padded(vol.label, center, crop, 0)
        image = (torch.from_numpy(img)[None] - self.prep.mean) / self.prep.std
        label = torch.from_numpy(lab)
        if crop != self.patch:
            image, label = warp_patch(image, label, matrix, mirrored, self.patch)
        image = augment_intensity(image, rng, self.aug)
        return image.float().contiguous(), label.long()


def _check_main(argv: list[str] | None = None) -> None:
    import argparse
    import sys

    from utils import run_cli

    p = argparse.ArgumentParser(description="Check a dataset folder without training.")
    p.add_argument("--check", required=True, help="dataset folder (imagesTr/ + labelsTr/)")
    p.add_argument("--label-map", default="auto", help="label map name or auto (default: auto)")

    def main(args):
        cases = find_cases(args.check)
        name = detect_label_map(args.check) if args.label_map == "auto" else args.label_map
        prep = Preprocessing()
        bad = 0
        for case in cases:
            try:
                v = load_case(case, prep, name)
            except UserError as e:  # one line per problem; the other cases are still checked
                bad += 1
                print(f"error: {e}", file=sys.stderr)
                continue
            present = [LABELS[c] for c in np.unique(v.label) if c]
            print(f"{case.name}: grid {v.image.shape}, organs {', '.join(present) or 'none'}")
        if bad:
            raise UserError(f"{args.check}: {bad} of {len(cases)} cases have problems (listed above); fix or remove them")

    run_cli(main, p.parse_args(argv))


if __name__ == "__main__":
    _check_main()
