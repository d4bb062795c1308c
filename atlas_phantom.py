"""Phantoms on real organ shapes: SynthSeg's idea (Billot et al., 2023) for abdominal CT.

The organs come from real label maps (FLARE22 and BTCV: liver, kidneys, spleen and, where the map
has them, pancreas, aorta, IVC, adrenals, gallbladder, oesophagus, stomach, duodenum), each case one
map under a random affine and smooth elastic deformation; KiTS23 maps, when given, add real renal
tumour and cyst shapes. Every organ is filled with a HU value drawn for one of five contrast
phases, pathology and artefacts are switched on per case with the probabilities below, and the
rest of the body (skin, fat, muscle wall, spine, ribs, psoas, bowel, colon, lung bases, pelvis,
table, arms) is painted procedurally around the organs by phantom.py's helpers.

docs/phantom.md describes the design: what is painted, the calibration and its sources, the
randomisation ranges and probabilities, and the labelling conventions.

A map is placed by its anatomy: the spine's axis is taken midway between the kidneys in x, 30 mm
behind the aorta's centre in y (vertebral radius 16-21 mm plus the aorta's), z = 0 at the kidneys'
mean height; the body outline is then sized to hold the organs inside its muscle wall.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from phantom import (
    PHASES,
    URINE,
    Canvas,
    Grid,
    _clinical_spacing,
    _paint_back,
    _paint_body,
    _paint_lungs,
    _paint_ribs,
    _rotation,
    _scan,
    _smooth_noise,
    _tissue,
    make_phantom,
)
from utils import UserError

# FLARE22 label values (its dataset.json) and our map: 1 liver, 2 right kidney, 3 left kidney, 4 spleen.
# Maps of other sets are converted to FLARE22 values on loading.
FLARE = {1: "liver", 2: "right_kidney", 3: "spleen", 4: "pancreas", 5: "aorta", 6: "ivc", 7: "right_adrenal",
         8: "left_adrenal", 9: "gallbladder", 10: "esophagus", 11: "stomach", 12: "duodenum", 13: "left_kidney"}
MASS = 20  # an extra-organ mass or cyst painted into the organ map: labelled background
MASS_FAT = 21  # the fat plane that parts such a mass from the organs it presses on: labelled background
TO_OURS = np.zeros(256, dtype=np.uint8)
TO_OURS[[1, 2, 13, 3]] = [1, 2, 3, 4]
# BTCV's 8-organ remap (1 spleen, 2 right kidney, 3 left kidney, 4 gallbladder, 5 liver, 6 stomach,
# 7 aorta, 8 pancreas) in FLARE22 values.
BTCV_TO_FLARE = np.zeros(256, dtype=np.uint8)
BTCV_TO_FLARE[1:9] = [3, 2, 13, 9, 1, 11, 5, 4]
REQUIRED = (1, 2, 3, 5, 13)  # the four targets, and the aorta that places the spine
ATLAS_SPACING = 2.0  # mm: maps are kept at this isotropic grid (a 512x512x100 map is ~5 MB there)
# Per-case probability of each phenomenon in an atlas phantom (docs/phantom.md, "Frequencies").
PROBABILITIES = {
    "liver_lesions": 0.4, "kidney_lesions": 0.25, "spleen_lesions": 0.1,  # inside the organ, its label
    "renal_mass": 0.3,  # a real KiTS23 tumour or cyst shape on a kidney (only with KiTS23 maps in --atlas)
    "mass": 0.35,  # a mass or cyst outside the organs, pressed against them (background)
    "mass_margin": 0.5,  # given a mass: its wall and a fat plane between it and the organs (background)
    "ascites": 0.1, "fatty_liver": 0.15, "hepatomegaly": 0.1, "splenomegaly": 0.1,
    "atrophic_kidney": 0.05, "missing_kidney": 0.04,
    "metal": 0.1, "low_dose": 0.15,
    "jejunum": 0.85,  # small-bowel loops in the left upper abdomen, walls enhancing with the phase (background)
    # Given the excretory phase: a split-bolus CT urography, whose kidneys, vessels, liver and spleen enhance as in
    # the nephrographic phase while excreted contrast fills the collecting systems. Off unless asked for.
    "split_bolus": 0.0,
    # The renal sinus open through the hilum, the pelvis leaving the kidney there (as in real kidneys), instead of
    # closed inside the parenchyma. Off unless asked for.
    "open_hilum": 0.0,
    # The kidneys' fat capsule 0-3 mm thick instead of 3-12 (a lean patient's): bowel, muscle and the other organs
    # come up against the kidney, as around the real IRCAD kidneys. Off unless asked for.
    "thin_perirenal": 0.0,
    # A second extra-organ mass, drawn as the first (its margins by the same mass_margin draw), so that training sees
    # more masses pressed against the organs beside the same lesions inside them. Off unless asked for.
    "second_mass": 0.0,
}
# Small-bowel and colon wall per phase: the jejunum's mucosa enhances as much as the spleen in the
# portal phase (IRCAD patient 1: 106 HU median, 86..118 p25..p75, in the loops beside its spleen and
# left kidney), so HU alone cannot tell the two apart there.
BOWEL_WALL = {"native": (30, 50), "arterial": (60, 130), "portal": (80, 150), "nephrographic": (80, 140),
              "excretory": (60, 110)}
# Drawn from a stream of their own after the others, so that a phantom without them is the same
# phantom as before they existed (bench_pathology's held-out rows among them).
LATE_DRAWS = ("mass_margin",)
LATE_STREAM = 2  # their stream: default_rng([seed, LATE_STREAM]); [seed, 1] is phantom_volume's slice profile
# Phenomena drawn, with their own tissues and sizes, from a stream each: default_rng([seed, n]). Whether they are
# on or off changes no other draw, so a phantom without them is bit for bit the one drawn before they existed.
OWN_STREAMS = {"split_bolus": 3, "open_hilum": 4, "thin_perirenal": 5, "second_mass": 6}
SPLIT_BOLUS_TISSUES = ("liver", "spleen", "cortex", "medulla", "aorta", "vein")
PHASE_PROBABILITIES = {"native": 0.25, "arterial": 0.15, "portal": 0.35, "nephrographic": 0.1, "excretory": 0.15}
MAPS_HELP = ("FLARE22 label maps (labelsTr/), BTCV 8-organ maps (label00NN.nii.gz) or, for renal lesion shapes, "
             "KiTS23 maps (case_XXXXX.nii.gz)")


def parse_probabilities(text: str) -> dict[str, float]:
    """'NAME=P,NAME=P' (train.py --phantom-prob) -> {name: probability}: overrides of PROBABILITIES and
    of PHASE_PROBABILITIES ('' -> {}). A name in neither, a P outside [0, 1] or phases given more than
    1 in all is a UserError naming the fix."""
    out = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, value = item.partition("=")
        try:
            p = float(value)
        except ValueError:
            p = -1.0
        if name not in PROBABILITIES and name not in PHASE_PROBABILITIES or not 0 <= p <= 1:
            raise UserError(f"--phantom-prob {item!r}: give NAME=P with P from 0 to 1 and NAME one of "
                            f"{', '.join(PROBABILITIES)} or a phase: {', '.join(PHASE_PROBABILITIES)}")
        out[name] = p
    if sum(p for name, p in out.items() if name in PHASE_PROBABILITIES) > 1 + 1e-9:
        raise UserError(f"--phantom-prob {text!r}: the phases given add up to more than 1; lower them")
    return out


def phase_probabilities(prob: dict | None = None) -> dict[str, float]:
    """PHASE_PROBABILITIES with the phases named in prob set to theirs and the others scaled to fill
    the rest in their default proportions (all given: as given, normalised)."""
    given = {k: v for k, v in (prob or {}).items() if k in PHASE_PROBABILITIES}
    if not given:
        return dict(PHASE_PROBABILITIES)  # as is, so that a seed draws the phase it always drew
    rest = {k: v for k, v in PHASE_PROBABILITIES.items() if k not in given}
    scale = (1 - sum(given.values())) / sum(rest.values()) if rest else 0.0
    out = {k: given[k] if k in given else rest[k] * scale for k in PHASE_PROBABILITIES}
    total = sum(out.values())
    return {k: v / total for k, v in out.items()}


@dataclass
class Atlas:
    """One label map on an RAS grid of ATLAS_SPACING mm, with the anatomy that places it."""

    name: str
    label: np.ndarray  # (X, Y, Z) uint8, FLARE22 values
    affine: np.ndarray  # (4, 4) voxel -> world RAS mm
    spine: np.ndarray  # (3,) world mm: spine axis (x, y) at the kidneys' mean height (z)
    lo: np.ndarray  # (3,) mm: organ bounding box relative to spine, low corner
    hi: np.ndarray  # (3,) mm: high corner
    z_scan: tuple[float, float]  # mm: the map's first and last slice relative to spine
    liver_top: float  # mm, relative to spine
    z_right_kidney: float  # mm, relative to spine
    z_left_kidney: float


@dataclass
class LesionShape:
    """A real renal tumour or cyst (KiTS23) on an RAS grid of ATLAS_SPACING mm: a shape to paste onto kidneys."""

    name: str
    kind: str  # "tumour" or "cyst"
    mask: np.ndarray  # (X, Y, Z) bool, cropped to the lesion


def _centroid(label: np.ndarray, value: int, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(label == value)
    return affine[:3, :3] @ idx.mean(0) + affine[:3, 3]


def _read_map(path: str) -> tuple[np.ndarray, np.ndarray]:
    """A label map as RAS (X, Y, Z) uint8 at ATLAS_SPACING mm (nearest neighbour) and its affine."""
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(path))
        data = np.asarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for unreadable files
        raise UserError(f"{path}: cannot read the label map ({type(e).__name__}); pass {MAPS_HELP} to --atlas") from None
    if data.ndim != 3:
        raise UserError(f"{path}: a {data.ndim}-D label map; --atlas needs 3-D {MAPS_HELP}")
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    step = ATLAS_SPACING / zooms
    idx = [np.minimum(np.round(np.arange(int(n / s)) * s).astype(int), n - 1) for n, s in zip(data.shape, step)]
    label = np.ascontiguousarray(data[np.ix_(*idx)]).astype(np.uint8)
    return label, img.affine @ np.diag([*step, 1.0])


def map_kind(path: str | Path, values: set[int] | None = None) -> str:
    """Which set a label map comes from: "flare22", "btcv" or "kits23", by its file name (FLARE22_*,
    label00NN*, case_*), else by its values (13 is FLARE22's left kidney; BTCV stops at 8, KiTS23 at 3)."""
    name = Path(path).name
    if name.startswith("case_"):
        return "kits23"
    if name.startswith("label0"):
        return "btcv"
    if name.startswith("FLARE") or values is None or 13 in values or max(values) > 8:
        return "flare22"
    return "kits23" if max(values) <= 3 else "btcv"


def _to_atlas(path: str, label: np.ndarray, affine: np.ndarray) -> Atlas:
    """An Atlas from a map in FLARE22 values, cropped in x and y to its organs (plus 20 mm)."""
    present = set(np.unique(label).tolist())
    missing = [FLARE[v] for v in REQUIRED if v not in present]
    if missing or max(present) > 13:
        what = f"no {', '.join(missing)}" if missing else f"label values up to {max(present)}"
        raise UserError(f"{path}: {what}; --atlas needs {MAPS_HELP} with liver, kidneys, spleen and aorta")
    organs = np.argwhere(label > 0)
    pad = int(20 / ATLAS_SPACING)
    lo = np.maximum(organs.min(0)[:2] - pad, 0)
    label = np.ascontiguousarray(label[lo[0]:organs.max(0)[0] + pad + 1, lo[1]:organs.max(0)[1] + pad + 1])
    affine = affine.copy()
    affine[:3, 3] += affine[:3, :2] @ lo
    rk, lk, ao = (_centroid(label, v, affine) for v in (2, 13, 5))
    spine = np.array([(rk[0] + lk[0]) / 2, ao[1] - 30.0, (rk[2] + lk[2]) / 2])
    organs = np.argwhere(label > 0)
    corners = np.stack([affine[:3, :3] @ organs.min(0), affine[:3, :3] @ organs.max(0)]) + affine[:3, 3]
    liver = np.argwhere(label == 1)
    z0 = affine[2, 3] - spine[2]
    return Atlas(
        name=Path(path).name.split(".")[0], label=label, affine=affine, spine=spine,
        lo=corners.min(0) - spine, hi=corners.max(0) - spine,
        z_scan=(float(z0), float(z0 + ATLAS_SPACING * (label.shape[2] - 1))),
        liver_top=float(affine[2, 2] * liver[:, 2].max() + affine[2, 3] - spine[2]),
        z_right_kidney=float(rk[2] - spine[2]), z_left_kidney=float(lk[2] - spine[2]))


def _to_lesions(path: str, label: np.ndarray) -> list[LesionShape]:
    """Each tumour (2) and cyst (3) of a KiTS23 map of at least 0.5 mL, as its own cropped shape."""
    shapes = []
    min_voxels = 500.0 / ATLAS_SPACING ** 3
    for value, kind in ((2, "tumour"), (3, "cyst")):
        parts, n = ndimage.label(label == value)
        for i, box in enumerate(ndimage.find_objects(parts)):
            mask = parts[box] == i + 1
            if mask.sum() >= min_voxels:
                shapes.append(LesionShape(f"{Path(path).name.split('.')[0]}_{kind}{i}", kind, mask))
    return shapes


@functools.lru_cache(maxsize=512)
def load_source(path: str) -> Atlas | tuple[LesionShape, ...]:
    """One map of --atlas: a FLARE22 or BTCV map as an Atlas (in FLARE22 values), a KiTS23 map as
    its lesion shapes. Cached per process."""
    label, affine = _read_map(path)
    kind = map_kind(path, set(np.unique(label).tolist()))
    if kind == "kits23":
        if label.max() > 3:
            raise UserError(f"{path}: label values up to {label.max()}; a KiTS23 map holds 1 kidney, 2 tumour, 3 cyst")
        return tuple(_to_lesions(path, label))
    if kind == "btcv":
        if label.max() > 8:
            raise UserError(f"{path}: label values up to {label.max()}; a BTCV map (label00NN) holds 1..8")
        label = BTCV_TO_FLARE[label]
    return _to_atlas(path, label, affine)


def load_atlas(path: str) -> Atlas:
    """Reads a FLARE22-style label map (1 liver, 2 right kidney, 3 spleen, 5 aorta, 13 left kidney,
    the others optional) or a BTCV 8-organ map into RAS at ATLAS_SPACING mm, in FLARE22 values."""
    source = load_source(path)
    if not isinstance(source, Atlas):
        raise UserError(f"{path}: a KiTS23 kidney map has no liver, spleen or aorta; it gives lesion shapes only")
    return source


def atlas_paths(folders: str | Path) -> list[Path]:
    """The label maps (*.nii.gz, *.nii) in one folder or several (comma-separated), sorted per
    folder; a clear error for a missing or empty one."""
    paths = []
    for part in str(folders).split(","):
        folder = Path(part.strip())
        if not folder.is_dir():
            raise UserError(f"{folder}: no such folder; --atlas needs folders of {MAPS_HELP}")
        found = sorted(p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii")))
        if not found:
            raise UserError(f"{folder}: holds no .nii.gz label maps; --atlas needs {MAPS_HELP}")
        paths += found
    return paths


def load_sources(folders: str | Path) -> tuple[list[Atlas], list[LesionShape]]:
    """Every map in --atlas's folders: the organ atlases (FLARE22, BTCV) and the renal lesion shapes
    (KiTS23). A clear error when no map gives organs."""
    atlases, lesions = [], []
    for path in atlas_paths(folders):
        source = load_source(str(path))
        if isinstance(source, Atlas):
            atlases.append(source)
        else:
            lesions += source
    if not atlases:
        raise UserError(f"{folders}: no organ maps; --atlas needs FLARE22 or BTCV label maps besides any KiTS23 ones")
    return atlases, lesions


KITS_NOTE = ("note: KiTS23 label maps are CC BY-NC-SA (non-commercial, share-alike): a model trained on phantoms "
             "with their lesion shapes may only be used and shared on those terms")


def _depth(mask: np.ndarray, spacing: tuple[float, ...], outside: bool = False, reach_mm: float = 0.0) -> np.ndarray:
    """Distance (mm) to the mask's surface: inside it, or with outside=True from it (valid up to
    reach_mm, inf beyond). Computed in the mask's bounding box only: a whole grid costs 10x more."""
    out = np.full(mask.shape, np.inf if outside else 0.0, dtype=np.float32)
    idx = np.argwhere(mask)
    if idx.size == 0:
        return out
    pad = [int(np.ceil(reach_mm / s)) + 1 for s in spacing]
    box = tuple(slice(max(0, lo - p), hi + 1 + p) for lo, hi, p in zip(idx.min(0), idx.max(0), pad))
    sub = mask[box]
    out[box] = ndimage.distance_transform_edt(~sub if outside else sub, sampling=spacing)
    return out


def _coords(c: Canvas, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """World mm of the box's voxels, broadcastable: (x, 1, 1), (1, y, 1), (1, 1, z)."""
    return c.x[box[0]][:, None, None], c.y[box[1]][None, :, None], c.z[box[2]][None, None, :]


def _bbox(mask: np.ndarray, pad: int = 0) -> tuple[slice, slice, slice] | None:
    idx = np.argwhere(mask)
    if idx.size == 0:
        return None
    return tuple(slice(max(0, lo - pad), hi + 1 + pad) for lo, hi in zip(idx.min(0), idx.max(0)))


def _world(c: Canvas, idx: np.ndarray) -> np.ndarray:
    """World mm of voxel indices (N, 3)."""
    return np.stack([c.x[idx[:, 0]], c.y[idx[:, 1]], c.z[idx[:, 2]]], axis=1)


def _surface(c: Canvas, mask: np.ndarray) -> np.ndarray:
    """World mm (N, 3) of the mask's surface voxels (within 1.5 voxels of its edge)."""
    box = _bbox(mask, 1)
    if box is None:
        return np.zeros((0, 3))
    sub = mask[box]
    edge = sub & (_depth(sub, c.grid.spacing) <= 1.5 * max(c.grid.spacing))
    idx = np.argwhere(edge) + [s.start for s in box]
    return _world(c, idx)


def _paint_kidney(c: Canvas, organs: np.ndarray, value: int, rng: np.random.Generator, hu_of: dict,
                  urine_hu: tuple[float, float], spine_x: float, spine_y: float,
                  hilum_rng: np.random.Generator | None = None) -> tuple[np.ndarray | None, np.ndarray]:
    """Cortex (a 4-8 mm rim, brighter in arterial and portal phase) around medulla, and the renal
    sinus: its deep part on the hilum's side (medial, anterior), fat holding the calyces and the
    renal pelvis, which hold urine (bright excreted contrast in the excretory phase). Given hilum_rng
    (open_hilum), the sinus opens through the hilum: a channel of sinus fat (7-12 mm radius) around the
    pelvis (3-6 mm), from the pelvis's centre to the kidney's surface toward the spine. All of it keeps
    the kidney's label (docs/phantom.md, "Labelling conventions"). Returns the pelvis's exit at the
    hilum (world mm, None without a sinus) and the collecting system's mask (grid shape, bool)."""
    u = rng.uniform
    mask = organs == value
    collecting = np.zeros(mask.shape, dtype=bool)
    box = _bbox(mask, 1)
    if box is None:
        return None, collecting
    sub = mask[box]
    depth = _depth(sub, c.grid.spacing)
    hu = c.hu[box]
    hu[sub] = hu_of["medulla"]
    hu[sub & (depth < u(4, 8))] = hu_of["cortex"]
    gx, gy, _ = _coords(c, box)
    centre = _world(c, np.argwhere(mask)).mean(0)
    hilum = np.array([spine_x - centre[0], spine_y + 30 - centre[1], 0.0])
    hilum /= max(float(np.linalg.norm(hilum)), 1e-6)
    toward = np.broadcast_to((gx - centre[0]) * hilum[0] + (gy - centre[1]) * hilum[1], sub.shape)
    sinus = sub & (depth > u(5, 9)) & (toward > -u(0, 8))
    if sinus.sum() < 4:
        return None, collecting
    sinus_hu = u(-100, -30) if rng.random() < 0.8 else u(-30, 10)  # sinus fat, fibrous in some
    hu[sinus] = sinus_hu
    # The pelvis fills the sinus's medial third, calyces branch from it toward the medulla.
    pelvis = sinus & (toward > np.quantile(toward[sinus], u(0.5, 0.75)))
    if not pelvis.any():  # a sinus one column wide across the hilum's direction: no medial third to take
        pelvis = sinus & (toward >= toward[sinus].max())
    calyces = sinus & (np.abs(_smooth_noise(rng, sub.shape, 6)) < u(0.08, 0.2))
    system = pelvis | calyces
    outlet, gap = pelvis, 8.0
    if hilum_rng is not None:  # no parenchyma between the pelvis and the hilum's fat: the sinus opens there
        start = _world(c, np.argwhere(pelvis) + [s.start for s in box]).mean(0)
        gz = _coords(c, box)[2]
        rel = (gx - start[0], gy - start[1], gz - start[2])
        along = rel[0] * hilum[0] + rel[1] * hilum[1]
        across = np.sqrt((rel[0] - along * hilum[0]) ** 2 + (rel[1] - along * hilum[1]) ** 2 + rel[2] ** 2)
        ahead = sub & (along > 0)
        fat_r, pelvis_r = hilum_rng.uniform(7, 12), hilum_rng.uniform(3, 6)
        hu[ahead & (across < fat_r)] = sinus_hu
        outlet = ahead & (across < pelvis_r)
        system |= outlet
        toward = np.broadcast_to(along, sub.shape)
        outlet, gap = (outlet, 2.0) if outlet.any() else (pelvis, 8.0)
    hu[system] = u(*urine_hu) * (1 + 0.1 * _smooth_noise(rng, sub.shape, 4)[system])
    collecting[box] = system
    exit_idx = np.argwhere(outlet)[np.argmax(toward[outlet])]
    return _world(c, (exit_idx + [s.start for s in box])[None])[0] + hilum * gap, collecting


def _paint_tube(c: Canvas, rng: np.random.Generator, points: list[np.ndarray], radius: float, hu: float,
                free: np.ndarray) -> np.ndarray:
    """A tube of the given radius (mm) through points (world mm), painted where free; returns its mask."""
    tube = np.zeros(c.grid.shape, dtype=bool)
    for p0, p1 in zip(points[:-1], points[1:]):
        n = max(2, int(np.linalg.norm(p1 - p0) / max(radius, 1.0)))
        for t in np.linspace(0, 1, n):
            blob = c.blob(p0 + (p1 - p0) * t, np.full(3, radius))
            if blob is not None:
                box, r = blob
                tube[box] |= r < 1
    tube &= free
    c.hu[tube] = hu
    return tube


def _paint_ureter(c: Canvas, rng: np.random.Generator, start: np.ndarray, side: float, spine_y: float, vert_r: float,
                  end: np.ndarray, urine_hu: tuple[float, float], free: np.ndarray) -> np.ndarray:
    """A ureter (radius 2-4 mm, background) from the renal pelvis's exit (start, mm) down along the
    psoas to end (the bladder, mm), opacified in segments as peristalsis leaves it."""
    u = rng.uniform
    mid = np.array([side * (vert_r + u(15, 30)), spine_y + u(5, 25), (start[2] + end[2]) / 2])
    low = np.array([side * u(30, 60), spine_y + u(20, 50), end[2] + u(20, 40)])
    path = [start, mid, low, end]
    tube = np.zeros(c.grid.shape, dtype=bool)
    for p0, p1 in zip(path[:-1], path[1:]):
        hu = u(*urine_hu) if rng.random() < 0.75 else u(15, 40)  # a collapsed stretch
        tube |= _paint_tube(c, rng, [p0, p1], u(2, 4), hu, free)
    return tube


def _lesion_hu(rng: np.random.Generator, kind: str, organ_hu: float, phase: str) -> float:
    """HU of a focal lesion (docs/phantom.md, "Pathology"): a simple cyst 0-20, a hypodense tumour
    20-70 HU under its organ, a hyperdense one (arterial hypervascular, or haemangioma, or a
    native-phase haemorrhage) 15-120 HU over it, a calcification 200-1000."""
    u = rng.uniform
    if kind == "cyst":
        return u(0, 20)
    if kind == "hypo":
        return max(organ_hu - u(20, 70), u(5, 25))
    if kind == "hyper":
        return organ_hu + (u(30, 120) if phase == "arterial" else u(15, 50))
    return u(200, 1000)


def _paint_lesions(c: Canvas, rng: np.random.Generator, organ: np.ndarray, n: int, organ_hu: float, phase: str,
                   radius: tuple[float, float] = (5, 25)) -> np.ndarray:
    """n lesions inside organ, clipped to it, keeping its label: cysts, hypo- and hyperdense tumours
    (radius in mm) and calcifications (radius 1.5-5 mm). Returns their mask (grid shape, bool)."""
    painted = np.zeros(organ.shape, dtype=bool)
    inside = np.argwhere(organ)
    if inside.size == 0:
        return painted
    for _ in range(n):
        kind = str(rng.choice(["cyst", "hypo", "hyper", "calcification"], p=[0.35, 0.35, 0.18, 0.12]))
        center = _world(c, inside[int(rng.integers(len(inside)))][None])[0]
        size = rng.uniform(1.5, 5) if kind == "calcification" else rng.uniform(*radius)
        lesion = c.blob(center, size * rng.uniform(0.8, 1.2, 3), _rotation(rng, (90, 90, 90)), wobble=0.1)
        if lesion is not None:
            box, r = lesion
            m = (r < 1) & organ[box]
            c.paint(box, m, _lesion_hu(rng, kind, organ_hu, phase))
            painted[box] |= m
    return painted


def _warp_box(c: Canvas, organs: np.ndarray, box: tuple[slice, slice, slice], src: list[np.ndarray]) -> np.ndarray:
    """The organ map sampled (nearest) at world mm src (x, y, z arrays over box)."""
    grid = c.grid
    idx = [(s - o) / d for s, o, d in zip(src, grid.origin, grid.spacing)]
    shape = tuple(sl.stop - sl.start for sl in box)
    idx = [np.broadcast_to(i, shape) for i in idx]
    return ndimage.map_coordinates(organs, idx, order=0, mode="nearest")


def _rescale_organ(c: Canvas, organs: np.ndarray, value: int, factor: float, anchor: np.ndarray,
                   claim: np.ndarray) -> None:
    """The organ scaled by factor about anchor (world mm): grown into claim (bool, grid) only, or shrunk,
    its freed voxels becoming background."""
    mask = organs == value
    box0 = _bbox(mask)
    if box0 is None:
        return
    lo = np.array([c.x[box0[0].start], c.y[box0[1].start], c.z[box0[2].start]])
    hi = np.array([c.x[box0[0].stop - 1], c.y[box0[1].stop - 1], c.z[box0[2].stop - 1]])
    lo, hi = anchor + (lo - anchor) * max(factor, 1.0), anchor + (hi - anchor) * max(factor, 1.0)
    box = c.box((lo + hi) / 2, float((hi - lo).max()) / 2 + 4)
    if box is None:
        return
    gx, gy, gz = _coords(c, box)
    src = [anchor[0] + (gx - anchor[0]) / factor, anchor[1] + (gy - anchor[1]) / factor,
           anchor[2] + (gz - anchor[2]) / factor]
    scaled = _warp_box(c, mask.view(np.uint8), box, src).astype(bool)
    region = organs[box]
    if factor >= 1:
        region[scaled & claim[box]] = value
    else:
        region[(region == value) & ~scaled] = 0


def _push(c: Canvas, organs: np.ndarray, center: np.ndarray, radius: float, push: float) -> None:
    """Organs pushed radially away from center (mm): what lay push mm inside radius moves out to it,
    the shift fading to none at radius + 2 push + 10 mm, so an organ pressed by a mass is indented."""
    reach = radius + 2 * push + 10
    box = c.box(center, reach)
    if box is None:
        return
    gx, gy, gz = _coords(c, box)
    d = [gx - center[0], gy - center[1], gz - center[2]]
    r = np.sqrt(d[0] ** 2 + d[1] ** 2 + d[2] ** 2)
    shift = push * np.clip((reach - r) / (reach - radius), 0, 1)
    ratio = np.maximum(r - shift, 0) / np.maximum(r, 1e-3)
    organs[box] = _warp_box(c, organs, box, [center[i] + d[i] * ratio for i in range(3)])


# Where extra-organ masses arise, and how often (hepatic and renal cysts are the commonest).
MASS_SITES = {"hepatic": 0.25, "renal": 0.25, "adrenal": 0.1, "pancreatic": 0.1, "duodenal": 0.08,
              "retroperitoneal": 0.12, "splenic": 0.1}


def _mass_site(c: Canvas, rng: np.random.Generator, organs: np.ndarray, site: str, radius: float
               ) -> np.ndarray | None:
    """Centre (world mm) of an extra-organ mass of the given radius at site: against the liver's
    underside (between it and the right kidney), on a kidney (exophytic), above a kidney (adrenal),
    in the pancreas or the duodenum, beside the aorta (retroperitoneal) or against the spleen."""
    u = rng.uniform
    anchor = {"hepatic": 1, "renal": int(rng.choice([2, 13])), "adrenal": int(rng.choice([2, 13])),
              "pancreatic": 4, "duodenal": 12, "retroperitoneal": 5, "splenic": 3}[site]
    mask = organs == anchor
    if mask.sum() < 8:
        return None
    centroid = _world(c, np.argwhere(mask)).mean(0)
    if site in ("pancreatic", "duodenal"):  # arising inside an organ that is background anyway
        inside = np.argwhere(mask)
        return _world(c, inside[int(rng.integers(len(inside)))][None])[0]
    if site == "retroperitoneal":
        inside = np.argwhere(mask)
        p = _world(c, inside[int(rng.integers(len(inside)))][None])[0]
        return p + np.array([rng.choice([-1, 1]) * (radius + u(5, 12)), u(-15, 10), 0])
    surface = _surface(c, mask)
    if len(surface) == 0:
        return None
    outward = np.zeros(3)
    z = surface[:, 2]
    if site == "hepatic":  # the underside, on the right and toward the back: over the right kidney
        keep = (z < np.quantile(z, 0.35)) & (surface[:, 0] > centroid[0] - 20) & (surface[:, 1] < centroid[1] + 20)
        outward = np.array([0.0, -0.3, -1.0])
    elif site == "adrenal":
        keep = z > np.quantile(z, 0.75)
        outward = np.array([np.sign(-centroid[0]) * 0.5, 0.0, 1.0])
    else:
        keep = np.ones(len(surface), dtype=bool)
    surface = surface[keep] if keep.any() else surface
    p = surface[int(rng.integers(len(surface)))]
    normal = p - centroid
    normal = normal / max(float(np.linalg.norm(normal)), 1e-6) + outward
    normal /= max(float(np.linalg.norm(normal)), 1e-6)
    return p + normal * radius * u(0.6, 1.0)


# The organs a mass at each site must touch (share of its outer surface >= MASS_TOUCH).
MASS_ANCHORS = {"hepatic": (1,), "renal": (2, 13), "splenic": (3,)}
MASS_TOUCH = 0.03
# At most this share of a mass's outer surface on any one target organ: a cyst wrapped in liver looks
# like a liver lesion, which is labelled liver, so an engulfed mass labelled background would teach
# two labels for one picture.
MASS_ENGULF = 0.5


def _pressed_not_engulfed(organs: np.ndarray, mask: np.ndarray, anchors: tuple[int, ...]) -> bool:
    """Whether a mass (bool, grid) touches one of anchors (organ-map values; any when empty) and lies
    mostly outside each target organ: no target organ holds more than MASS_ENGULF of its outer shell."""
    box = _bbox(mask, pad=2)
    sub = mask[box]
    shell = ndimage.binary_dilation(sub) & ~sub
    around = organs[box][shell]
    share = {v: float((around == v).mean()) for v in (1, 2, 13, 3)}
    touching = not anchors or any(share[v] >= MASS_TOUCH for v in anchors)
    return touching and max(share.values()) <= MASS_ENGULF


def _paint_mass(c: Canvas, rng: np.random.Generator, organs: np.ndarray, cavity: np.ndarray, phase: str,
                site: str | None = None, margin: np.random.Generator | None = None) -> np.ndarray:
    """One cyst or mass outside the organs (2-15 cm across, background), pressed against them: the
    organs around are pushed aside and indented. Fluid (0-20 HU), proteinaceous (20-45), solid
    (30-55 HU plus 0-80 of enhancement) or rim-enhancing around a necrotic centre. Marked MASS in
    organs; returns its mask (grid shape, bool), empty when it found no place. With margin (a
    generator of its own), the margins that tell such a mass from a lesion inside the organ are
    drawn too (_paint_mass_margin)."""
    u = rng.uniform
    mask = np.zeros(organs.shape, dtype=bool)
    before = {v: int((organs == v).sum()) for v in (1, 2, 3, 13)}
    saved = organs.copy()
    sites = [site] if site else rng.choice(list(MASS_SITES), 3, replace=False, p=list(MASS_SITES.values()))
    tries = [str(s) for s in sites for _ in range(3)]  # three places per site; a map may lack the site's organ
    for attempt in tries:
        radius = float(np.exp(u(np.log(10), np.log(75))))  # 2-15 cm across, small ones commoner
        center = _mass_site(c, rng, organs, attempt, radius)
        if center is None:
            continue
        _push(c, organs, center, radius, radius * u(0.2, 0.5))
        blob = c.blob(center, radius * u(0.8, 1.2, 3), _rotation(rng, (90, 90, 90)), wobble=0.08, cells=4)
        if blob is not None:
            box, r = blob
            mask[box] = (r < 1) & cavity[box]
            organs[mask] = MASS
            if (mask.any() and all((organs == v).sum() >= 0.5 * n for v, n in before.items())
                    and _pressed_not_engulfed(organs, mask, MASS_ANCHORS.get(attempt, ()))):
                break
        organs[:] = saved
        mask[:] = False
    if not mask.any():
        return mask
    enhance = {"native": 0.0, "arterial": u(10, 70), "portal": u(20, 80), "nephrographic": u(20, 70),
               "excretory": u(10, 50)}[phase]
    kind = rng.random()
    if kind < 0.35:
        c.hu[mask] = u(0, 20)
    elif kind < 0.45:
        c.hu[mask] = u(20, 45)
    else:
        solid = u(30, 55) + enhance
        box = _bbox(mask)
        sub = mask[box]
        hu = c.hu[box]
        hu[sub] = solid + 8 * _smooth_noise(rng, sub.shape, 5)[sub]
        if kind >= 0.75:  # rim-enhancing: a 2-8 mm wall around fluid or necrosis
            hu[sub & (_depth(sub, c.grid.spacing) > u(2, 8))] = u(5, 30)
    if margin is not None:
        _paint_mass_margin(c, margin, organs, cavity, mask, fluid=kind < 0.45, enhance=enhance)
    return mask


def _paint_mass_margin(c: Canvas, rng: np.random.Generator, organs: np.ndarray, cavity: np.ndarray,
                       mask: np.ndarray, fluid: bool, enhance: float) -> None:
    """What parts a mass from the organs it presses on, and a lesion inside an organ has not: a
    fluid mass's own wall (1-3 mm, 25-50 HU plus half the phase's enhancement) and a fat plane
    (1-4 mm, -110 to -60 HU) around it, carved out of the background and the four organs beside it
    (a preserved fat plane is the radiologist's sign that a mass does not arise from the organ).
    The plane is marked MASS_FAT in organs (labelled background, kept off by later painters). Each
    layer is at least one voxel thick, however coarse the grid."""
    u = rng.uniform
    voxel = min(c.grid.spacing)
    box = _bbox(mask, pad=int(np.ceil(4 / voxel)) + 1)
    sub, hu, region = mask[box], c.hu[box], organs[box]
    if fluid:
        hu[sub & (_depth(sub, c.grid.spacing) <= max(u(1, 3), voxel))] = u(25, 50) + 0.5 * enhance
    near = _depth(sub, c.grid.spacing, outside=True, reach_mm=4.0) <= max(u(1, 4), voxel)
    plane = near & ~sub & cavity[box] & np.isin(region, (0, 1, 2, 13, 3))
    region[plane] = MASS_FAT
    hu[plane] = u(-110, -60)


def _paste_renal_lesion(c: Canvas, rng: np.random.Generator, organs: np.ndarray, shape: LesionShape, phase: str,
                        hu_of: dict) -> np.ndarray:
    """A real renal tumour or cyst shape (KiTS23) on a kidney, centred near its surface: its part
    inside the kidney keeps the kidney's label, its exophytic part is background (MASS). Returns the
    pasted lesion's mask (grid shape, bool)."""
    u = rng.uniform
    pasted = np.zeros(organs.shape, dtype=bool)
    kidney = int(rng.choice([v for v in (2, 13) if (organs == v).sum() > 8] or [0]))
    if kidney == 0:
        return pasted
    mask = ndimage.zoom(shape.mask.astype(np.uint8), [ATLAS_SPACING * u(0.6, 1.1) / s for s in c.grid.spacing],
                        order=0)
    mask = mask[tuple(slice(None, None, int(rng.choice([-1, 1]))) for _ in range(3))].astype(bool)
    if not mask.any():
        return pasted
    surface = _surface(c, organs == kidney)
    centroid = _world(c, np.argwhere(organs == kidney)).mean(0)
    p = surface[int(rng.integers(len(surface)))]
    inward = (centroid - p) / max(float(np.linalg.norm(centroid - p)), 1e-6)
    extent = np.array(mask.shape) * c.grid.spacing
    center = p + inward * float(extent.max()) / 2 * u(-0.3, 0.5)
    start = np.round((center - np.array(c.grid.origin)) / c.grid.spacing - np.array(mask.shape) / 2).astype(int)
    lo, hi = np.maximum(start, 0), np.minimum(start + mask.shape, c.grid.shape)
    if (hi <= lo).any():
        return pasted
    pasted[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = mask[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))]
    pasted &= (organs == kidney) | (organs == 0)
    organs[pasted & (organs == 0)] = MASS
    if shape.kind == "cyst":
        c.hu[pasted] = u(0, 20)
    else:  # renal cell carcinoma: soft tissue enhancing less than cortex, with necrosis
        box = _bbox(pasted)
        sub = pasted[box]
        base = u(25, 45) + (0.0 if phase == "native" else u(0.3, 0.8) * (hu_of["cortex"] - 30))
        hu = c.hu[box]
        noise = _smooth_noise(rng, sub.shape, 5)
        hu[sub] = base + 15 * noise[sub]
        hu[sub & (noise < -u(0.2, 0.6))] = u(10, 30)
    return pasted


def _paint_ascites(c: Canvas, rng: np.random.Generator, organs: np.ndarray, cavity: np.ndarray, rho: np.ndarray,
                   a: float, fat: float, wall: float, spine_y: float, vert_r: float, z_top: float) -> np.ndarray:
    """Ascites (0-25 HU, background): pockets of a 3-15 mm layer inside the abdominal wall and a layer
    around the liver and spleen, below the diaphragm (z_top, mm), outside the organs and the central
    retroperitoneum (spine, psoas, great vessels), never over bone or gas. Returns its mask (grid shape, bool)."""
    u = rng.uniform
    thick = u(3, 15)
    X, Y, Z = c.x[:, None, None], c.y[None, :, None], c.z[None, None, :]
    layer = (rho > 1.0 - (fat + wall + thick) / a) & (_smooth_noise(rng, c.grid.shape, 4) > u(-0.3, 0.3))
    around = _depth((organs == 1) | (organs == 3), c.grid.spacing, outside=True, reach_mm=thick) < thick
    central = (np.abs(X) < vert_r + 60) & (Y < spine_y + vert_r + 20)
    fluid = cavity & (layer | around) & (organs == 0) & ~central & (Z < z_top) & (c.hu > -500) & (c.hu < 150)
    c.hu[fluid] = u(0, 25)
    return fluid


def _paint_metal(c: Canvas, rng: np.random.Generator, body: np.ndarray, spine_y: float, vert_r: float,
                 heads: list[np.ndarray]) -> np.ndarray:
    """Metal (2000-3071 HU): spinal rods, surgical clips or a hip prosthesis (when the hips are in
    view), with the streaks it casts: bright and dark lines radiating in the axial plane, fading
    over 5-20 cm, and a dark beam-hardening band between two metal objects. Returns the metal's mask."""
    u = rng.uniform
    X, Y = c.x[:, None], c.y[None, :]
    kind = str(rng.choice(["spine", "clips", "hip"] if heads else ["spine", "clips"]))
    objects = []  # (centre mm, radius mm, z half-extent mm)
    if kind == "spine":
        zc = u(c.z[0], c.z[-1])
        for side in (-1, 1):
            objects.append((np.array([side * vert_r * u(0.4, 0.7), spine_y - vert_r - u(3, 10), zc]), u(2.5, 3.5),
                            u(30, 80)))
    elif kind == "hip":
        for head in heads[:int(rng.integers(1, 3))]:
            objects.append((head, u(20, 26), u(20, 26)))
    else:
        clips = int(rng.integers(1, 5))
        while len(objects) < clips:
            idx = np.array([int(rng.integers(n)) for n in c.grid.shape])
            if body[tuple(idx)]:
                objects.append((_world(c, idx[None])[0], u(1, 2.5), u(2, 6)))
    metal = np.zeros(c.grid.shape, dtype=bool)
    streaks = np.zeros(c.grid.shape[:2], dtype=np.float32)
    for center, radius, half_z in objects:
        m = ((X - center[0]) ** 2 + (Y - center[1]) ** 2 < radius ** 2)[:, :, None]
        m = m & (np.abs(c.z - center[2]) < half_z)[None, None, :]
        metal |= m
        fade = np.exp(-np.hypot(X - center[0], Y - center[1]) / u(50, 200))
        for angle in rng.uniform(0, np.pi, int(rng.integers(4, 14))):
            across = np.abs((X - center[0]) * np.sin(angle) - (Y - center[1]) * np.cos(angle))
            streaks += rng.choice([-1, 1]) * u(100, 600) * radius / 3 * np.exp(-(across / u(1, 3)) ** 2) * fade
    if len(objects) >= 2:  # beam hardening: a dark band along the line joining the first two objects
        (p, _, _), (q, _, _) = objects[:2]
        d = q[:2] - p[:2]
        length = max(float(np.linalg.norm(d)), 1e-3)
        along = ((X - p[0]) * d[0] + (Y - p[1]) * d[1]) / length
        across = np.abs((X - p[0]) * d[1] - (Y - p[1]) * d[0]) / length
        streaks -= u(50, 250) * np.exp(-(across / u(3, 10)) ** 2) * ((along > 0) & (along < length))
    zs = np.abs(c.z[None, :] - np.array([o[0][2] for o in objects])[:, None]) < np.array([o[2] for o in objects])[:, None]
    rows = zs.any(0)
    region = c.hu[:, :, rows]
    region += np.where(body[:, :, rows], streaks[:, :, None], 0)
    c.hu[:, :, rows] = region
    c.hu[metal] = u(2000, 3071)
    return metal


def _paint_pelvis(c: Canvas, rng: np.random.Generator, cavity: np.ndarray, organs: np.ndarray, spine_y: float,
                  vert_r: float, z_crest: float, a: float, urine_hu: tuple[float, float] = (0, 20)) -> dict:
    """Below the iliac crests (z_crest, mm): iliac wings flaring out behind the cavity, the sacrum
    continuing the spine, femoral heads 100-140 mm lower, and a bladder in front whose excreted
    contrast (urine_hu) layers at the back, as the patient lies supine; never over organs.
    Returns the world mm of the bladder's centre ("bladder") and of the femoral heads ("heads")."""
    u = rng.uniform
    X, Y, Z = c.x[:, None, None], c.y[None, :, None], c.z[None, None, :]
    free = (organs == 0)
    where: dict = {"bladder": None, "heads": []}
    depth = np.clip((z_crest - Z) / 120.0, 0, 1)  # 0 at the crest, 1 at the acetabulum
    for side in (-1, 1):
        # A wing: a thin curved plate whose centre moves in and forward going down.
        cx = side * a * u(0.45, 0.6) * (1 - 0.45 * depth)
        cy = spine_y + u(0, 15) + 30 * depth
        ring = np.abs(np.hypot(X - cx, (Y - cy) / 1.6) - u(35, 45) * (1 - 0.3 * depth))
        wing = (ring < u(3, 6)) & (Z < z_crest) & (Z > z_crest - 130) & (side * (X - cx) > -25)
        c.hu[wing & free] = u(300, 700)
        head_c = np.array([side * u(80, 100), spine_y + u(40, 60), z_crest - u(100, 140)])
        where["heads"].append(head_c)
        head = c.blob(head_c, np.full(3, u(21, 26)))
        if head is not None:
            box, r = head
            c.paint(box, (r < 1) & free[box], u(250, 450))
            c.paint(box, (r < 0.8) & free[box], u(100, 250))
    sacrum = (X ** 2 + ((Y - spine_y - 10 * depth) / 0.7) ** 2 < (vert_r * 1.6) ** 2) & (Z < z_crest - 20)
    c.hu[sacrum & free & ~cavity] = u(200, 400)
    where["bladder"] = np.array([u(-15, 15), spine_y + u(70, 110), z_crest - u(110, 150)])
    bladder = c.blob(where["bladder"], (u(30, 50), u(25, 40), u(25, 45)))
    if bladder is not None:
        box, r = bladder
        m = (r < 1) & free[box] & cavity[box]
        c.paint(box, m, u(0, 20))
        if urine_hu[0] > 100:
            layer = c.y[box[1]][None, :, None] < where["bladder"][1] + u(-30, 30)
            c.paint(box, m & layer, u(*urine_hu))
    return where


def _liver_side(c: Canvas, liver: np.ndarray) -> float:
    """+1.0 if the liver's voxels (N, 3 indices) lie at positive x, else -1.0: the patient's right,
    whatever the orientation."""
    return 1.0 if c.x[liver[:, 0]].mean() > 0 else -1.0


def _paint_diaphragm(c: Canvas, rng: np.random.Generator, organs: np.ndarray, cavity: np.ndarray, muscle_hu: float
                     ) -> np.ndarray:
    """The diaphragm and the wall's inner muscle, 2.5-6 mm of muscle HU (background) on the liver's
    and spleen's dome, outer flank and back, with no fat between: on real CT the liver lies against
    it, and a model that has only seen fat around the liver has no cue to stop at it (a likely source
    of the rim of over-segmentation seen on real CT). Returns the painted mask (X, Y, Z) bool."""
    u = rng.uniform
    painted = np.zeros(c.grid.shape, bool)
    liver = np.argwhere(organs == 1)
    if len(liver) == 0:
        return painted
    right = _liver_side(c, liver)
    thick = u(2.5, 6.0)
    for value, side in ((1, right), (3, -right)):
        organ = organs == value
        box = _bbox(organ, int(np.ceil(thick / min(c.grid.spacing))) + 1)
        if box is None:
            continue
        shell = (_depth(organ[box], c.grid.spacing, outside=True, reach_mm=thick + 1) < thick) & (organs[box] == 0)
        shell &= cavity[box]
        p = _world(c, np.argwhere(organ))
        mid, spread = p.mean(0), p.std(0)
        x, y, z = _coords(c, box)
        back = (y < mid[1] - 0.5 * spread[1]) & (z > mid[2] - spread[2])
        shell &= (z > mid[2]) | (side * (x - mid[0]) > 0.5 * spread[0]) | back
        painted[box] |= shell
    c.hu[painted] = muscle_hu + 5 * rng.standard_normal(int(painted.sum()))
    return painted


def _underside(c: Canvas, organ: np.ndarray, right: float) -> np.ndarray:
    """World mm (N, 3) of the organ's voxels with none of it below, on the right lobe (x beyond the
    organ's middle on the side `right`) and in its lower half: where the hepatic flexure presses."""
    bottom = organ.copy()
    bottom[:, :, 1:] &= ~organ[:, :, :-1]
    p = _world(c, np.argwhere(bottom))
    if len(p) == 0:
        return p
    mid = _world(c, np.argwhere(organ)).mean(0)
    return p[(right * (p[:, 0] - mid[0]) > 0) & (p[:, 2] < mid[2])]


def _colon_path(rng: np.random.Generator, organs: np.ndarray, c: Canvas, a: float, b: float, z_crest: float
                ) -> list[tuple[np.ndarray, float]]:
    """Centre points (mm) and radii of the colon: cecum and ascending colon up the liver's flank to
    the hepatic flexure under it, the transverse colon sagging across the front, the splenic flexure
    under the spleen and the descending colon down the other flank. Steps of about a third of a radius."""
    u = rng.uniform
    liver, spleen = np.argwhere(organs == 1), np.argwhere(organs == 3)
    if len(liver) == 0 or len(spleen) == 0:
        return []
    right = _liver_side(c, liver)
    z_liver = float(np.quantile(c.z[liver[:, 2]], 0.03))
    z_spleen = float(np.quantile(c.z[spleen[:, 2]], 0.1))
    hepatic = np.array([right * u(0.45, 0.65) * a, u(-0.1, 0.35) * b, z_liver - u(0, 25)])
    r_ascending = u(22, 35)
    # Most often the hepatic flexure sits in the underside of the liver's right lobe, so the model must
    # find the boundary between organ and bowel, not a layer of fat (on a real CT, stool pressed into the
    # liver was painted liver), and the ascending colon lies on the right kidney's perirenal fat.
    press = rng.random() < 0.75
    if press:
        under = _underside(c, organs == 1, right)
        if len(under):
            hepatic = under[int(rng.integers(len(under)))] - [0.0, 0.0, u(0.4, 0.8) * r_ascending]
    splenic = np.array([-right * u(0.5, 0.7) * a, u(-0.2, 0.2) * b, z_spleen + u(-20, 20)])
    cecum = np.array([right * u(0.4, 0.6) * a, u(-0.1, 0.3) * b, z_crest - u(10, 60)])
    sag = np.array([u(-30, 30), u(0.35, 0.65) * b, min(z_liver, z_spleen) - u(10, 90)])  # transverse, mid
    r_transverse = u(18, 30)
    sigmoid = np.array([-right * u(0.5, 0.65) * a, u(-0.2, 0.1) * b, z_crest - u(0, 50)])
    r_descending = u(15, 25)
    waypoints = [cecum, hepatic, sag, splenic, sigmoid]
    radii = [r_ascending, r_transverse, r_transverse, r_descending]
    kidney = np.argwhere(organs == 2)
    if press and len(kidney):  # in front of and beside the right kidney's lower half, on its fat (the caller keeps it)
        k = _world(c, kidney)
        low = k[k[:, 2] < np.quantile(k[:, 2], u(0.2, 0.5))]
        side = low[(right * low[:, 0] > right * k[:, 0].mean()) & (low[:, 1] > k[:, 1].mean())]
        if len(side):
            p = side[int(rng.integers(len(side)))]
            out = p - k.mean(0)
            out[2] = 0.0
            renal = p + out / (np.linalg.norm(out) + 1e-6) * u(0.4, 0.8) * r_ascending
            waypoints.insert(1, renal)
            radii.insert(0, r_ascending)
    points = []
    for p0, p1, r in zip(waypoints[:-1], waypoints[1:], radii):
        n = max(2, int(np.linalg.norm(p1 - p0) / (r / 3)))
        wander = np.cumsum(rng.normal(0, r / 8, (n, 3)), axis=0)
        wander -= np.linspace(0, 1, n)[:, None] * wander[-1]  # the ends stay put
        points += [(p0 + (p1 - p0) * t + w, r * u(0.85, 1.15)) for t, w in zip(np.linspace(0, 1, n), wander)]
    return points


def _paint_colon(c: Canvas, rng: np.random.Generator, organs: np.ndarray, cavity: np.ndarray, a: float, b: float,
                 z_crest: float, wall_hu: float) -> np.ndarray:
    """The colon, never over organs, inside `cavity` (where the caller has left out the perirenal fat):
    its contents stool (mottled, -20 to 45 HU with gas bubbles), fluid (0-30 HU) or gas, each stretch
    drawn apart, inside a 2-4 mm wall of wall_hu (BOWEL_WALL, the phase's) -20..0 HU. A stool-filled
    right colon under the liver is soft tissue a model must not call liver. Returns its mask (X, Y, Z) bool."""
    u = rng.uniform
    colon = np.zeros(c.grid.shape, dtype=bool)
    for center, r in _colon_path(rng, organs, c, a, b, z_crest):
        blob = c.blob(center, r * u(0.85, 1.15, 3), wobble=0.15, cells=3)
        if blob is not None:
            box, rr = blob
            colon[box] |= rr < 1
    colon &= (organs == 0) & cavity
    idx = np.argwhere(colon)
    if idx.size == 0:
        return colon
    box = tuple(slice(lo, hi + 1) for lo, hi in zip(idx.min(0), idx.max(0)))
    inside = colon[box]
    extent = max((hi - lo) * s for lo, hi, s in zip(idx.min(0), idx.max(0), c.grid.spacing))
    cells = int(np.clip(extent / 12.0, 4, 40))  # ~12 mm features
    mottle, stretch = (_smooth_noise(rng, inside.shape, cells) for _ in range(2))
    bubbles = _smooth_noise(rng, inside.shape, min(3 * cells, 80))  # gas bubbles of ~4 mm
    kind = np.digitize(stretch, [-0.25, 0.25])  # 0, 1, 2: which of three contents per stretch
    contents = np.empty(inside.shape, dtype=np.float32)
    for k in range(3):
        roll = rng.random()
        if roll < 0.55:
            fill = u(-20, 45) + 25 * mottle  # overlaps liver HU in native scans: the texture must tell
            fill = np.where(bubbles > u(0.5, 0.9), -950 + u(0, 200), fill)
        elif roll < 0.7:
            fill = np.full(inside.shape, u(0, 30), dtype=np.float32)
        else:
            fill = np.full(inside.shape, -1000 + u(0, 100), dtype=np.float32)
        contents = np.where(kind == k, fill, contents)
    contents[inside & (_depth(inside, c.grid.spacing) < u(2, 4))] = wall_hu - u(0, 20)
    region = c.hu[box]
    region[inside] = contents[inside]
    return colon


def _paint_jejunum(c: Canvas, rng: np.random.Generator, organs: np.ndarray, cavity: np.ndarray, wall_hu: float
                   ) -> np.ndarray:
    """Jejunal loops (background) in the left upper abdomen, from about the spleen's middle down
    60-120 mm past its tip, in front of the kidneys, never over organs and inside `cavity` (the
    caller leaves out the perirenal fat): 15-30 mm loops whose 2-4 mm wall enhances with the phase
    (wall_hu, BOWEL_WALL), each loop collapsed (all wall, feathery mucosa), fluid-filled (0-30 HU)
    or with oral contrast (150-350 HU). On a portal-venous CT such loops lie against the spleen's
    tip and the left kidney's fat at the spleen's HU. Returns the painted mask (X, Y, Z) bool."""
    u = rng.uniform
    painted = np.zeros(c.grid.shape, bool)
    liver, spleen = np.argwhere(organs == 1), np.argwhere(organs == 3)
    if len(liver) == 0 or len(spleen) == 0:
        return painted
    left = -_liver_side(c, liver)
    s = _world(c, spleen)
    top = s[:, 2].mean() + u(-10, 20)
    bottom = s[:, 2].min() - u(60, 120)
    kidneys = np.argwhere((organs == 2) | (organs == 13))
    front = c.y[kidneys[:, 1]].mean() if len(kidneys) else s[:, 1].mean()  # intraperitoneal: in front
    x, y, z = _coords(c, tuple(slice(None) for _ in range(3)))
    region = cavity & (organs == 0) & (z < top) & (z > bottom) & (y > front - u(0, 15)) & (left * x > -60)
    box = _bbox(region)
    if box is None:
        return painted
    inside = region[box]
    extent = max((sl.stop - sl.start) * sp for sl, sp in zip(box, c.grid.spacing))
    cells = int(np.clip(extent / 25.0, 3, 30))  # loops 15-30 mm across
    loops, kind, mottle = (_smooth_noise(rng, inside.shape, cells) for _ in range(3))
    # fewer loops towards the midline and none 60 mm past it: the jejunum keeps to the left
    fade = np.clip(-left * x[box[0]] / 60.0, 0.0, 1.0)
    loop = inside & (loops > u(0.1, 0.3) + 0.6 * fade)
    if not loop.any():
        return painted
    fill = np.where(kind < -0.2, u(0, 30), wall_hu - 10 + 25 * mottle)  # fluid or collapsed mucosa
    if rng.random() < 0.2:
        fill = np.where(kind > 0.5, u(150, 350), fill)  # positive oral contrast
    fill = fill.astype(np.float32)
    fill[loop & (_depth(loop, c.grid.spacing) < u(2, 4))] = wall_hu
    sub = c.hu[box]
    sub[loop] = fill[loop]
    painted[box] = loop
    return painted


def _paint_arms(c: Canvas, rng: np.random.Generator, a: float, b: float, hu_of: dict) -> None:
    """Arms down at the sides (many trauma and older scans): fat, muscle and a humerus each side."""
    u = rng.uniform
    X, Y = c.x[:, None, None], c.y[None, :, None]
    for side in (-1, 1):
        r = u(38, 55)
        cx, cy = side * (a + u(10, 50) + r), u(-0.3, 0.2) * b
        d2 = (X - cx) ** 2 + (Y - cy) ** 2
        limb = np.broadcast_to(d2 < r ** 2, c.hu.shape)
        c.hu[limb] = u(-120, -85)
        c.hu[np.broadcast_to(d2 < (r - u(4, 15)) ** 2, c.hu.shape)] = hu_of["muscle"]
        bx, by, br = cx + u(-10, 10), cy + u(-10, 10), u(9, 13)
        bone = (X - bx) ** 2 + (Y - by) ** 2
        c.hu[np.broadcast_to(bone < br ** 2, c.hu.shape)] = u(600, 1200)
        c.hu[np.broadcast_to(bone < (br - 3) ** 2, c.hu.shape)] = u(50, 250)


def make_atlas_phantom(seed: int, atlases: list[Atlas], spacing: tuple[float, float, float] | None = None,
                       slice_mm: float = 0.0, lesions: list[LesionShape] | tuple = (), prob: dict | None = None,
                       phase: str | None = None, info: dict | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic abdominal CT whose organs are a deformed real label map.

    Returns (hu, label, affine) as phantom.make_phantom: hu (X, Y, Z) int16 HU, label (X, Y, Z)
    uint8 in the project's map, affine (4, 4) RAS mm. spacing (mm) defaults to a random clinical one;
    slice_mm as in make_phantom. lesions: real renal lesion shapes (KiTS23) to paste onto kidneys.
    prob overrides entries of PROBABILITIES (1.0 forces a phenomenon on, 0.0 off) and of
    PHASE_PROBABILITIES (see phase_probabilities); phase forces a contrast phase. A dict given as info
    receives what was painted: the phase, the phenomena drawn, the painted HU before scanner blur and
    noise ("painted", X, Y, Z float32) and each phenomenon's mask (X, Y, Z bool), the perirenal fat,
    jejunum, diaphragm and colon among them.
    """
    if not atlases:
        raise UserError(f"no atlas label maps given; pass folders of {MAPS_HELP} to --atlas")
    rng = np.random.default_rng(seed)
    u = rng.uniform
    p = {**PROBABILITIES, **{k: v for k, v in (prob or {}).items() if k in PROBABILITIES}}
    on = {name: bool(rng.random() < p[name]) for name in PROBABILITIES  # forced or not
          if name not in LATE_DRAWS and name not in OWN_STREAMS}
    late = np.random.default_rng([seed, LATE_STREAM])
    on |= {name: bool(late.random() < p[name]) for name in LATE_DRAWS}
    own = {name: np.random.default_rng([seed, stream]) for name, stream in OWN_STREAMS.items()}
    on |= {name: bool(own[name].random() < p[name]) for name in OWN_STREAMS}
    atlas = atlases[int(rng.integers(len(atlases)))]
    phases = phase_probabilities(prob)
    drawn = str(rng.choice(list(phases), p=list(phases.values())))
    phase = phase or drawn
    urine = URINE[phase]
    # Domain randomisation: each tissue +-15 HU beyond its phase's range (docs/phantom.md, "Calibration").
    hu_of = {k: _tissue(rng, v) + u(-15, 15) for k, v in PHASES[phase].items()}
    if phase == "excretory" and on["split_bolus"]:
        split = own["split_bolus"]
        hu_of |= {k: _tissue(split, PHASES["nephrographic"][k]) + split.uniform(-15, 15) for k in SPLIT_BOLUS_TISSUES}
    if on["fatty_liver"]:  # steatosis: the liver at least 10 HU under the spleen
        hu_of["liver"] = min(hu_of["liver"], hu_of["spleen"]) - u(10, 45)
    found: dict = {"phase": phase, "on": on}

    # Shape: the map scaled 0.85-1.15 (a little anisotropically), turned up to 8 degrees.
    scale = u(0.88, 1.12) * u(0.95, 1.05, 3)
    rot = _rotation(rng, (6, 6, 8))
    reach = np.maximum(-atlas.lo, atlas.hi)[:2] * scale[:2] + 8.0

    # Body sized to hold the organs inside its muscle wall; the spine sits 25-38% of the half-depth
    # behind the centre, as in the procedural phantom.
    fat = u(8, 40)
    wall = u(8, 15)
    vert_r = u(16, 21)
    k = u(0.25, 0.38)
    a = max(reach[0] + wall + fat + u(0, 20), 135.0)
    b_front = (atlas.hi[1] * scale[1] + 8.0 + fat + wall + u(0, 15)) / (1 + k)
    b_back = (0.5 * fat + wall - atlas.lo[1] * scale[1]) / (0.9 - k)
    b = max(b_front, b_back, u(95, 130))
    spine_y = -b * k

    z_lo, z_hi = (z * scale[2] for z in atlas.z_scan)
    z_kidneys = min(atlas.z_right_kidney, atlas.z_left_kidney) * scale[2]
    z_crest = z_kidneys - u(70, 100)  # iliac crests, about L4
    top = z_hi - u(0, 30)
    bottom = z_lo + u(-40, 30)
    fov_z = rng.random()
    if fov_z < 0.2:  # a scan stopping at the kidneys' lower poles
        bottom = max(bottom, z_kidneys - u(30, 60))
    elif fov_z < 0.45:  # an abdomen-pelvis scan starting at the liver or the kidneys, down to the hips
        top = min(top, atlas.liver_top * scale[2] - u(20, 140))
        bottom = min(bottom, z_crest - u(60, 200))
    if spacing is None:
        spacing = _clinical_spacing(rng)
    fov = max(2 * a, 2 * b) + u(30, 90)
    if rng.random() < 0.2:  # a field of view narrower than the body: its sides cut off
        fov = min(fov, 2 * a * u(0.8, 1.0))
    arms = rng.random() < 0.35
    if arms and rng.random() < 0.5:
        fov += u(100, 200)
    nx, ny = int(round(fov / spacing[0])), int(round(fov / spacing[1]))
    nz = max(8, int(round((top - bottom) / spacing[2])))
    origin = (-fov / 2 + u(-15, 15), -fov / 2 + u(-10, 10), bottom)
    grid = Grid((nx, ny, nz), tuple(float(s) for s in spacing), origin)
    c = Canvas(grid, rng)

    rho, inner, cavity = _paint_body(c, rng, hu_of, a, b, fat, wall, fov, bottom, top)
    if arms:
        _paint_arms(c, rng, a, b, hu_of)
    _paint_lungs(c, rng, cavity, a, b, vert_r, atlas.liver_top * scale[2] - u(5, 25))
    _paint_back(c, rng, hu_of, inner, spine_y, vert_r, atlas.z_right_kidney * scale[2])

    # Organs: each grid point q (spine frame) looked up in the map at spine + rot (q / scale) + elastic.
    amp = u(0, 8)
    elastic = [amp * _smooth_noise(rng, grid.shape, 5) for _ in range(3)]
    inv = np.linalg.inv(atlas.affine)
    m = inv[:3, :3] @ rot @ np.diag(1.0 / scale)
    t = inv[:3, :3] @ atlas.spine + inv[:3, 3]
    q = (c.x[:, None, None], c.y[None, :, None] - spine_y, c.z[None, None, :])
    coords = [m[i, 0] * q[0] + m[i, 1] * q[1] + m[i, 2] * q[2] + t[i] + elastic[i] * inv[i, i] for i in range(3)]
    organs = ndimage.map_coordinates(atlas.label, coords, order=0, mode="constant", cval=0)
    del coords, elastic

    # Organ size: hepato- and splenomegaly grow down and forward from the organ's top; a kidney shrunk
    # (atrophy) or gone (nephrectomy, agenesis: its label removed with it).
    free = (organs == 0) & cavity
    for value, name in ((1, "hepatomegaly"), (3, "splenomegaly")):
        if on[name] and (organs == value).any():
            idx = np.argwhere(organs == value)
            top = _world(c, idx).mean(0)
            top[2] = c.z[idx[:, 2].max()]
            _rescale_organ(c, organs, value, u(1.15, 1.4), top, free | (organs == value))
    kidney_values = [v for v in (2, 13) if (organs == v).any()]
    if on["missing_kidney"] and kidney_values:
        organs[organs == int(rng.choice(kidney_values))] = 0
    elif on["atrophic_kidney"] and kidney_values:
        v = int(rng.choice(kidney_values))
        _rescale_organ(c, organs, v, u(0.55, 0.8), _world(c, np.argwhere(organs == v)).mean(0), free)
    # Masses and cysts outside the organs, pressed against them (background), and real renal
    # tumours and cysts (KiTS23) on a kidney. Their HU is painted now: later painters keep off MASS.
    if on["mass"]:
        _paint_mass(c, rng, organs, cavity, phase, margin=late if on["mass_margin"] else None)
    if on["second_mass"]:
        second = own["second_mass"]
        _paint_mass(c, second, organs, cavity, phase, margin=second if on["mass_margin"] else None)
    found["mass"] = organs == MASS  # where the masses lie now: a second one's push may have moved the first
    found["mass_fat"] = organs == MASS_FAT
    found["renal_mass"] = np.zeros(grid.shape, bool)
    if on["renal_mass"] and lesions:
        shape = lesions[int(rng.integers(len(lesions)))]
        found["renal_mass"] = _paste_renal_lesion(c, rng, organs, shape, phase, hu_of)
    pasted = found["renal_mass"] & (organs != MASS)
    saved = c.hu[pasted]

    hu = c.hu
    # Perirenal fat: the kidneys sit in a fat capsule 3-12 mm thick, the retroperitoneum's sharpest cue; 0-3 mm
    # in a lean patient (thin_perirenal), where the cue is mostly gone.
    kidneys = (organs == 2) | (organs == 13)
    found["perirenal"] = np.zeros(grid.shape, bool)
    if kidneys.any():
        thick = u(3, 12)  # drawn either way, so that the main stream's later draws stay where they were
        if on["thin_perirenal"]:
            thick = own["thin_perirenal"].uniform(0, 3)
        found["perirenal"] = (_depth(kidneys, grid.spacing, outside=True, reach_mm=12.0) < thick) & (organs == 0) & cavity
        hu[found["perirenal"]] = u(-110, -70)
    tex = _smooth_noise(rng, grid.shape, 8)
    liver = organs == 1
    hu[liver] = hu_of["liver"] + 6 * tex[liver]
    vessels = _smooth_noise(rng, grid.shape, 20)
    hu[liver & (np.abs(vessels) < u(0.02, 0.05))] = hu_of["vein"] if phase != "arterial" else hu_of["liver"] - 10
    spleen = organs == 3
    hu[spleen] = hu_of["spleen"] + (25 if phase == "arterial" else 5) * tex[spleen]
    exits = {}
    found["collecting"] = np.zeros(grid.shape, bool)
    for v in (2, 13):
        exits[v], system = _paint_kidney(c, organs, v, rng, hu_of, urine, 0.0, spine_y,
                                         own["open_hilum"] if on["open_hilum"] else None)
        found["collecting"] |= system
    hu[pasted] = saved  # the pasted renal lesion's intrarenal part
    found["collecting"] &= ~pasted
    # Lesions inside an organ keep its label (as in FLARE22, LiTS, IRCAD).
    found["lesions"] = np.zeros(grid.shape, bool)
    for name, value, count, radius in (("liver_lesions", 1, 6, (5, 40)), ("kidney_lesions", 2, 3, (5, 25)),
                                       ("kidney_lesions", 13, 3, (5, 25)), ("spleen_lesions", 3, 3, (5, 20))):
        if on[name]:
            organ_hu = hu_of["liver"] if value == 1 else hu_of["spleen"] if value == 3 else hu_of["cortex"]
            found["lesions"] |= _paint_lesions(c, rng, organs == value, int(rng.integers(1, count + 1)), organ_hu,
                                               phase, radius)
    hu[organs == 4] = u(10, 110) + u(-15, 15)  # pancreas, fatty in the old (TotalSegmentator example: -7)
    hu[organs == 5] = hu_of["aorta"]
    hu[organs == 6] = hu_of["vein"]
    hu[(organs == 7) | (organs == 8)] = u(10, 60)  # adrenals
    hu[organs == 9] = u(0, 25)  # gallbladder bile
    hu[organs == 10] = u(30, 60)  # oesophagus
    hu[organs == 12] = u(20, 50) if rng.random() < 0.75 else u(150, 350)  # duodenum, oral contrast or not
    stomach = organs == 11
    if stomach.any():
        hu[stomach] = u(30, 60)  # wall
        lumen = stomach & (_depth(stomach, grid.spacing) > u(3, 6))
        fill = u(0, 30) if rng.random() < 0.75 else u(150, 350)
        hu[lumen] = fill
        if lumen.any() and rng.random() < 0.7:  # an air cap at the front: the patient lies supine
            ys = np.broadcast_to(c.y[None, :, None], lumen.shape)[lumen]
            level = np.quantile(ys, u(0.5, 0.9))
            hu[lumen & (c.y[None, :, None] > level)] = -1000 + u(0, 100)
    wall_hu = _tissue(rng, BOWEL_WALL[phase]) + u(-15, 15)
    peritoneal = cavity & ~found["perirenal"]  # where bowel may lie: never inside the kidneys' fat capsule
    found["jejunum"] = np.zeros(grid.shape, bool)
    if on["jejunum"]:
        found["jejunum"] = _paint_jejunum(c, rng, organs, peritoneal, wall_hu)
    found["diaphragm"] = _paint_diaphragm(c, rng, organs, cavity, hu_of["muscle"])
    found["colon"] = np.zeros(grid.shape, bool)
    if rng.random() < 0.9:
        found["colon"] = _paint_colon(c, rng, organs, peritoneal, a, b, z_crest, wall_hu)
    c.label = TO_OURS[organs]

    _paint_ribs(c, rng, rho, a, fat, wall, bottom, atlas.z_left_kidney * scale[2])
    where = {"bladder": None, "heads": []}
    if bottom < z_crest:
        where = _paint_pelvis(c, rng, cavity, organs, spine_y, vert_r, z_crest, a, urine)
    found["ureter"] = np.zeros(grid.shape, bool)
    if urine[0] > 100:  # opacified ureters down to the bladder (or out of view below)
        for v, side in ((2, 1.0), (13, -1.0)):
            if exits.get(v) is not None:
                end = where["bladder"] if where["bladder"] is not None else np.array(
                    [side * u(30, 50), spine_y + u(30, 60), bottom - 20])
                found["ureter"] |= _paint_ureter(c, rng, exits[v], side, spine_y, vert_r, end, urine,
                                                 (organs == 0) & cavity)
    found["ascites"] = np.zeros(grid.shape, bool)
    if on["ascites"]:
        found["ascites"] = _paint_ascites(c, rng, organs, cavity, rho, a, fat, wall, spine_y, vert_r,
                                          atlas.liver_top * scale[2] - 10)
    found["metal"] = np.zeros(grid.shape, bool)
    if on["metal"]:
        found["metal"] = _paint_metal(c, rng, rho < 1.0, spine_y, vert_r, where["heads"])
    if info is not None:
        info.update(found, painted=c.hu.copy(), organs=organs)
    # Scanner: sharp thin-slice to smooth thick-slice reconstructions, noisy to clean; low-dose
    # scans far noisier.
    noise = (40, 90) if on["low_dose"] else (5, 40)
    return _scan(c, rng, (0.5, 2.0), noise, (0.3, 1.5), slice_mm), c.label, grid.affine


def phantom_volume(seed: int, kind: str, spacing: float, clip: tuple[float, float], atlas: str = "",
                   prob: str = ""):
    """One phantom made directly on a training grid (isotropic spacing, mm, RAS), clipped to clip
    (HU) and cropped to the body, as a dataset.Volume: what train.py --stream trains on, with no
    files written. kind: "procedural" (make_phantom), "atlas" (make_atlas_phantom: organ shapes from the
    label maps in the folders atlas, comma-separated; prob: overrides of PROBABILITIES, 'NAME=P,...')
    or "mixed" (even seeds procedural, odd ones atlas). Each gets a slice profile of 0.5-5 mm, as the
    scans it stands for had before resampling."""
    from dataset import body_volume

    slice_mm = float(np.random.default_rng([seed, 1]).uniform(0.5, 5.0))
    if kind == "atlas" or (kind == "mixed" and seed % 2):
        atlases, lesions = load_sources(atlas)
        hu, label, affine = make_atlas_phantom(seed, atlases, (spacing,) * 3, slice_mm, lesions,
                                               prob=parse_probabilities(prob) or None)
    else:
        hu, label, affine = make_phantom(seed, (spacing,) * 3, slice_mm)
    return body_volume(f"phantom_{seed}", np.clip(hu.astype(np.float32), *clip), label, affine, clip)
