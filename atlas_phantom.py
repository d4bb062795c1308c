"""Phantoms on real organ shapes: SynthSeg's idea (Billot et al., 2023) for abdominal CT.

The organs come from real label maps (FLARE22 training labels: liver, kidneys, spleen, pancreas,
aorta, IVC, adrenals, gallbladder, oesophagus, stomach, duodenum), each case one map under a
random affine and smooth elastic deformation. Every organ is filled with a HU value drawn for a
contrast phase, and the rest of the body (skin, fat, muscle wall, spine, ribs, psoas, bowel, colon, lung
bases, table, arms) is painted procedurally around them by phantom.py's helpers. Domain
randomisation is wider than the procedural phantom's: per-tissue HU offsets, scanner blur and
noise from thin-slice sharp to thick-slice smooth, partial fields of view, arms at the sides.

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
FLARE = {1: "liver", 2: "right_kidney", 3: "spleen", 4: "pancreas", 5: "aorta", 6: "ivc", 7: "right_adrenal",
         8: "left_adrenal", 9: "gallbladder", 10: "esophagus", 11: "stomach", 12: "duodenum", 13: "left_kidney"}
TO_OURS = np.zeros(256, dtype=np.uint8)
TO_OURS[[1, 2, 13, 3]] = [1, 2, 3, 4]
REQUIRED = (1, 2, 3, 5, 13)  # the four targets, and the aorta that places the spine
ATLAS_SPACING = 2.0  # mm: maps are kept at this isotropic grid (a 512x512x100 map is ~5 MB there)


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


def _centroid(label: np.ndarray, value: int, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(label == value)
    return affine[:3, :3] @ idx.mean(0) + affine[:3, 3]


@functools.lru_cache(maxsize=64)
def load_atlas(path: str) -> Atlas:
    """Reads a FLARE22-style label map (1 liver, 2 right kidney, 3 spleen, 5 aorta, 13 left kidney,
    the others optional) into RAS at ATLAS_SPACING mm (nearest neighbour). Cached per process."""
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(path))
        data = np.asarray(img.dataobj)
    except Exception as e:  # nibabel raises many types for unreadable files
        raise UserError(f"{path}: cannot read the label map ({type(e).__name__}); pass FLARE22 label maps "
                        f"(labelsTr/*.nii.gz) to --atlas") from None
    if data.ndim != 3:
        raise UserError(f"{path}: a {data.ndim}-D label map; --atlas needs 3-D FLARE22 label maps")
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    step = ATLAS_SPACING / zooms
    idx = [np.minimum(np.round(np.arange(int(n / s)) * s).astype(int), n - 1) for n, s in zip(data.shape, step)]
    label = np.ascontiguousarray(data[np.ix_(*idx)]).astype(np.uint8)
    affine = img.affine @ np.diag([*step, 1.0])
    present = set(np.unique(label).tolist())
    missing = [FLARE[v] for v in REQUIRED if v not in present]
    if missing or max(present) > 13:
        what = f"no {', '.join(missing)}" if missing else f"label values up to {max(present)}"
        raise UserError(f"{path}: {what}; --atlas needs FLARE22 label maps (1 liver, 2 right kidney, 3 spleen, "
                        f"5 aorta, 13 left kidney)")
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


def atlas_paths(folder: str | Path) -> list[Path]:
    """The label maps (*.nii.gz, *.nii) in folder, sorted; a clear error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder; --atlas needs a folder of FLARE22 label maps (labelsTr/)")
    paths = sorted(p for p in folder.iterdir() if p.name.endswith((".nii.gz", ".nii")))
    if not paths:
        raise UserError(f"{folder}: holds no .nii.gz label maps; --atlas needs FLARE22 label maps (labelsTr/)")
    return paths


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


def _fill_kidney(hu: np.ndarray, mask: np.ndarray, spacing: tuple[float, ...], rng: np.random.Generator,
                 hu_of: dict) -> None:
    """Cortex (a 4-8 mm rim, brighter in arterial and portal phase) around medulla."""
    depth = _depth(mask, spacing)
    hu[mask] = hu_of["medulla"]
    hu[mask & (depth < rng.uniform(4, 8))] = hu_of["cortex"]


def _paint_lesions(c: Canvas, rng: np.random.Generator, organ: np.ndarray, n: int, hu_range: tuple[float, float]
                   ) -> None:
    """n round lesions (radius 5-25 mm, HU in hu_range) centred inside organ, clipped to it."""
    inside = np.argwhere(organ)
    if inside.size == 0:
        return
    for _ in range(n):
        center = np.array([ax[i] for ax, i in zip((c.x, c.y, c.z), inside[int(rng.integers(len(inside)))])])
        lesion = c.blob(center, np.full(3, rng.uniform(5, 25)), wobble=0.1)
        if lesion is not None:
            box, r = lesion
            c.paint(box, (r < 1) & organ[box], rng.uniform(*hu_range))


def _paint_pelvis(c: Canvas, rng: np.random.Generator, cavity: np.ndarray, organs: np.ndarray, spine_y: float,
                  vert_r: float, z_crest: float, a: float) -> None:
    """Below the iliac crests (z_crest, mm): iliac wings flaring out behind the cavity, the sacrum
    continuing the spine, femoral heads 100-140 mm lower, and a bladder in front; never over organs."""
    u = rng.uniform
    X, Y, Z = c.x[:, None, None], c.y[None, :, None], c.z[None, None, :]
    free = (organs == 0)
    depth = np.clip((z_crest - Z) / 120.0, 0, 1)  # 0 at the crest, 1 at the acetabulum
    for side in (-1, 1):
        # A wing: a thin curved plate whose centre moves in and forward going down.
        cx = side * a * u(0.45, 0.6) * (1 - 0.45 * depth)
        cy = spine_y + u(0, 15) + 30 * depth
        ring = np.abs(np.hypot(X - cx, (Y - cy) / 1.6) - u(35, 45) * (1 - 0.3 * depth))
        wing = (ring < u(3, 6)) & (Z < z_crest) & (Z > z_crest - 130) & (side * (X - cx) > -25)
        c.hu[wing & free] = u(300, 700)
        z_head = z_crest - u(100, 140)
        head = c.blob((side * u(80, 100), spine_y + u(40, 60), z_head), np.full(3, u(21, 26)))
        if head is not None:
            box, r = head
            c.paint(box, (r < 1) & free[box], u(250, 450))
            c.paint(box, (r < 0.8) & free[box], u(100, 250))
    sacrum = (X ** 2 + ((Y - spine_y - 10 * depth) / 0.7) ** 2 < (vert_r * 1.6) ** 2) & (Z < z_crest - 20)
    c.hu[sacrum & free & ~cavity] = u(200, 400)
    bladder = c.blob((u(-15, 15), spine_y + u(70, 110), z_crest - u(110, 150)), (u(30, 50), u(25, 40), u(25, 45)))
    if bladder is not None:
        box, r = bladder
        c.paint(box, (r < 1) & free[box] & cavity[box], u(0, 20))


def _colon_path(rng: np.random.Generator, organs: np.ndarray, c: Canvas, a: float, b: float, z_crest: float
                ) -> list[tuple[np.ndarray, float]]:
    """Centre points (mm) and radii of the colon: cecum and ascending colon up the liver's flank to
    the hepatic flexure under it, the transverse colon sagging across the front, the splenic flexure
    under the spleen and the descending colon down the other flank. Steps of about a third of a radius."""
    u = rng.uniform
    liver, spleen = np.argwhere(organs == 1), np.argwhere(organs == 3)
    if len(liver) == 0 or len(spleen) == 0:
        return []
    right = 1.0 if c.x[liver[:, 0]].mean() > 0 else -1.0  # the liver's side, whatever the orientation
    z_liver = float(np.quantile(c.z[liver[:, 2]], 0.03))
    z_spleen = float(np.quantile(c.z[spleen[:, 2]], 0.1))
    hepatic = np.array([right * u(0.45, 0.65) * a, u(-0.1, 0.35) * b, z_liver - u(0, 25)])
    splenic = np.array([-right * u(0.5, 0.7) * a, u(-0.2, 0.2) * b, z_spleen + u(-20, 20)])
    cecum = np.array([right * u(0.4, 0.6) * a, u(-0.1, 0.3) * b, z_crest - u(10, 60)])
    r_ascending = u(22, 35)
    sag = np.array([u(-30, 30), u(0.35, 0.65) * b, min(z_liver, z_spleen) - u(10, 90)])  # transverse, mid
    r_transverse = u(18, 30)
    sigmoid = np.array([-right * u(0.5, 0.65) * a, u(-0.2, 0.1) * b, z_crest - u(0, 50)])
    r_descending = u(15, 25)
    waypoints = [cecum, hepatic, sag, splenic, sigmoid]
    radii = [r_ascending, r_transverse, r_transverse, r_descending]
    points = []
    for p0, p1, r in zip(waypoints[:-1], waypoints[1:], radii):
        n = max(2, int(np.linalg.norm(p1 - p0) / (r / 3)))
        wander = np.cumsum(rng.normal(0, r / 8, (n, 3)), axis=0)
        wander -= np.linspace(0, 1, n)[:, None] * wander[-1]  # the ends stay put
        points += [(p0 + (p1 - p0) * t + w, r * u(0.85, 1.15)) for t, w in zip(np.linspace(0, 1, n), wander)]
    return points


def _paint_colon(c: Canvas, rng: np.random.Generator, organs: np.ndarray, cavity: np.ndarray, a: float, b: float,
                 z_crest: float) -> None:
    """The colon, never over organs: its contents stool (mottled, -20 to 45 HU with gas bubbles),
    fluid (0-30 HU) or gas, each stretch drawn apart, inside a 2-4 mm wall of 20-50 HU. A stool-filled
    right colon under the liver is soft tissue a model must not call liver."""
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
        return
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
    contents[inside & (_depth(inside, c.grid.spacing) < u(2, 4))] = u(20, 50)
    region = c.hu[box]
    region[inside] = contents[inside]


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
                       slice_mm: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic abdominal CT whose organs are a deformed real label map.

    Returns (hu, label, affine) as phantom.make_phantom: hu (X, Y, Z) int16 HU, label (X, Y, Z)
    uint8 in the project's map, affine (4, 4) RAS mm. spacing (mm) defaults to a random clinical one;
    slice_mm as in make_phantom.
    """
    if not atlases:
        raise UserError("no atlas label maps given; pass a folder of FLARE22 label maps to --atlas")
    rng = np.random.default_rng(seed)
    u = rng.uniform
    atlas = atlases[int(rng.integers(len(atlases)))]
    phase = str(rng.choice(list(PHASES), p=[0.3, 0.15, 0.55]))
    # Domain randomisation: each tissue +-15 HU beyond its phase's range (scanner calibration, kVp,
    # contrast timing; the TotalSegmentator example's native kidneys measure ~15 HU, its liver 46).
    hu_of = {k: _tissue(rng, v) + u(-15, 15) for k, v in PHASES[phase].items()}

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

    hu = c.hu
    # Perirenal fat: the kidneys sit in a fat capsule 3-12 mm thick, the retroperitoneum's sharpest cue.
    kidneys = (organs == 2) | (organs == 13)
    if kidneys.any():
        near = _depth(kidneys, grid.spacing, outside=True, reach_mm=12.0) < u(3, 12)
        hu[near & (organs == 0) & cavity] = u(-110, -70)
    tex = _smooth_noise(rng, grid.shape, 8)
    liver = organs == 1
    hu[liver] = hu_of["liver"] + 6 * tex[liver]
    vessels = _smooth_noise(rng, grid.shape, 20)
    hu[liver & (np.abs(vessels) < u(0.02, 0.05))] = hu_of["vein"] if phase != "arterial" else hu_of["liver"] - 10
    # Lesions keep their organ's label (as in FLARE22, LiTS, IRCAD): hypodense metastases or cysts
    # in a third of livers (0-45 HU, 5-25 mm), simple cysts (0-20 HU) in a fifth of kidneys.
    for organ, prob, count, hu_range in ((1, 0.35, 6, (0, 45)), (2, 0.2, 2, (0, 20)), (13, 0.2, 2, (0, 20))):
        if rng.random() < prob:
            _paint_lesions(c, rng, organs == organ, int(rng.integers(1, count + 1)), hu_range)
    spleen = organs == 3
    hu[spleen] = hu_of["spleen"] + (25 if phase == "arterial" else 5) * tex[spleen]
    for v in (2, 13):
        _fill_kidney(hu, organs == v, grid.spacing, rng, hu_of)
    hu[organs == 4] = u(40, 110) + u(-15, 15)  # pancreas
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
    if rng.random() < 0.9:
        _paint_colon(c, rng, organs, cavity, a, b, z_crest)
    c.label = TO_OURS[organs]

    _paint_ribs(c, rng, rho, a, fat, wall, bottom, atlas.z_left_kidney * scale[2])
    if bottom < z_crest:
        _paint_pelvis(c, rng, cavity, organs, spine_y, vert_r, z_crest, a)
    # Scanner: sharp thin-slice to smooth thick-slice reconstructions, noisy to clean.
    return _scan(c, rng, (0.5, 2.0), (5, 40), (0.3, 1.5), slice_mm), c.label, grid.affine


def phantom_volume(seed: int, kind: str, spacing: float, clip: tuple[float, float], atlas: str = ""):
    """One phantom made directly on a training grid (isotropic spacing, mm, RAS), clipped to clip
    (HU) and cropped to the body, as a dataset.Volume: what train.py --stream trains on, with no
    files written. kind: "procedural" (make_phantom), "atlas" (make_atlas_phantom: organ shapes from the
    FLARE22 label maps in the folder atlas) or "mixed" (even seeds procedural, odd ones atlas).
    Each gets a slice profile of 0.5-5 mm, as the scans it stands for had before resampling."""
    from dataset import body_volume

    slice_mm = float(np.random.default_rng([seed, 1]).uniform(0.5, 5.0))
    if kind == "atlas" or (kind == "mixed" and seed % 2):
        atlases = [load_atlas(str(p)) for p in atlas_paths(atlas)]
        hu, label, affine = make_atlas_phantom(seed, atlases, (spacing,) * 3, slice_mm)
    else:
        hu, label, affine = make_phantom(seed, (spacing,) * 3, slice_mm)
    return body_volume(f"phantom_{seed}", np.clip(hu.astype(np.float32), *clip), label, affine, clip)
