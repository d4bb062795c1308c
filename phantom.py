"""Procedural synthetic abdominal CT: the embedded default dataset.

Each case is drawn from a seed: a body with skin, subcutaneous fat and a muscle wall, spine,
ribs, paraspinal and psoas muscles, aorta and IVC, lung bases, stomach, pancreas, bowel with gas,
a gallbladder, and the four target organs (liver right upper, spleen left upper, kidneys
posterior on either side of the spine, the right one lower), each an irregular deformed shape
whose size, position, contrast phase and noise vary from case to case. Liver, spleen and muscle
overlap in HU in every phase, so a network has to learn shape and position, not a threshold.

Coordinates are world RAS in mm (+x the patient's right, +y anterior, +z superior), with the
spine's axis at x = 0. Volumes are built on an RAS grid, then written in RAS or LPS at varied
spacing so the geometry code runs on them. HU values and sizes are typical adult values
(see the ranges next to each structure).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from utils import LABELS

LIVER, RIGHT_KIDNEY, LEFT_KIDNEY, SPLEEN = 1, 2, 3, 4

# Mean HU per tissue and contrast phase (ranges and sources: docs/phantom.md, "Calibration"). The
# procedural phantom draws the first three; atlas phantoms all five.
PHASES = {
    "native":   {"liver": (50, 65), "spleen": (38, 52), "cortex": (28, 40), "medulla": (25, 35),
                 "aorta": (35, 50), "vein": (35, 50), "muscle": (40, 60)},
    "arterial": {"liver": (65, 85), "spleen": (90, 140), "cortex": (170, 280), "medulla": (60, 110),
                 "aorta": (250, 400), "vein": (60, 110), "muscle": (45, 65)},
    "portal":   {"liver": (95, 135), "spleen": (100, 135), "cortex": (150, 250), "medulla": (130, 200),
                 "aorta": (140, 200), "vein": (140, 200), "muscle": (50, 70)},
    "nephrographic": {"liver": (95, 130), "spleen": (100, 130), "cortex": (150, 250), "medulla": (150, 250),
                      "aorta": (130, 190), "vein": (130, 190), "muscle": (50, 70)},
    "excretory": {"liver": (75, 105), "spleen": (75, 105), "cortex": (110, 180), "medulla": (110, 180),
                  "aorta": (100, 150), "vein": (100, 150), "muscle": (50, 70)},
}
PROCEDURAL_PHASES = ("native", "arterial", "portal")
# Urine in the calyces, renal pelvis, ureters and bladder: excreted contrast only in the excretory
# phase (CT urography, 5-15 min), where it reaches 300 to over 2000 HU.
URINE = {"native": (0, 20), "arterial": (0, 20), "portal": (0, 30), "nephrographic": (10, 60),
         "excretory": (300, 2500)}


@dataclass
class Grid:
    """An RAS-aligned grid: shape (nx, ny, nz), spacing (mm), origin (world mm of voxel 0)."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]

    def axes(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(
            (o + s * np.arange(n, dtype=np.float32)).astype(np.float32)
            for o, s, n in zip(self.origin, self.spacing, self.shape)
        )

    @property
    def affine(self) -> np.ndarray:
        a = np.diag([*self.spacing, 1.0])
        a[:3, 3] = self.origin
        return a


def _rotation(rng: np.random.Generator, max_deg: tuple[float, float, float]) -> np.ndarray:
    angles = [math.radians(rng.uniform(-m, m)) for m in max_deg]
    cx, sx = math.cos(angles[0]), math.sin(angles[0])
    cy, sy = math.cos(angles[1]), math.sin(angles[1])
    cz, sz = math.cos(angles[2]), math.sin(angles[2])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], cells: int) -> np.ndarray:
    """Low-frequency 3D noise in about [-1, 1]: a random lattice of `cells` per axis, spline-smoothed
    on a small grid, then linearly interpolated to shape (far faster than a spline at full size)."""
    import torch
    import torch.nn.functional as F

    coarse = rng.standard_normal([cells] * 3).astype(np.float32)
    mid = [min(s, cells * 4) for s in shape]
    smooth = ndimage.zoom(coarse, [m / cells for m in mid], order=3, mode="mirror", grid_mode=True)
    full = F.interpolate(torch.from_numpy(smooth)[None, None], size=tuple(shape), mode="trilinear",
                         align_corners=False)
    return full[0, 0].numpy() / 1.5


class Canvas:
    """HU and label volumes on a grid, painted structure by structure (later paints win)."""

    def __init__(self, grid: Grid, rng: np.random.Generator):
        self.grid = grid
        self.rng = rng
        self.x, self.y, self.z = grid.axes()
        self.hu = np.full(grid.shape, -1000.0, dtype=np.float32)
        self.label = np.zeros(grid.shape, dtype=np.uint8)

    def box(self, center: np.ndarray, half: float) -> tuple[slice, slice, slice] | None:
        """Index box around center with half-size half (mm), clipped; None when outside the grid."""
        sl = []
        for c, axis in zip(center, (self.x, self.y, self.z)):
            lo = np.searchsorted(axis, c - half)
            hi = np.searchsorted(axis, c + half)
            if hi <= lo:
                return None
            sl.append(slice(lo, hi))
        return tuple(sl)

    def blob(self, center, radii, rot: np.ndarray | None = None, wobble: float = 0.0,
             cells: int = 5) -> tuple[tuple[slice, slice, slice], np.ndarray] | None:
        """Normalised ellipsoid radius r (r < 1 inside) in the blob's box, its surface displaced by
        smooth noise of relative amplitude wobble: a deformed, irregular organ shape."""
        center = np.asarray(center, dtype=np.float32)
        radii = np.asarray(radii, dtype=np.float32)
        box = self.box(center, float(radii.max()) * (1.0 + 2 * wobble) + 2.0)
        if box is None:
            return None
        gx = self.x[box[0]][:, None, None] - center[0]
        gy = self.y[box[1]][None, :, None] - center[1]
        gz = self.z[box[2]][None, None, :] - center[2]
        rot = np.eye(3) if rot is None else rot
        # local = rot^T (p - c): the blob's own axes
        lx = rot[0, 0] * gx + rot[1, 0] * gy + rot[2, 0] * gz
        ly = rot[0, 1] * gx + rot[1, 1] * gy + rot[2, 1] * gz
        lz = rot[0, 2] * gx + rot[1, 2] * gy + rot[2, 2] * gz
        r = np.sqrt((lx / radii[0]) ** 2 + (ly / radii[1]) ** 2 + (lz / radii[2]) ** 2)
        if wobble:
            r = r + wobble * _smooth_noise(self.rng, r.shape, cells)
        return box, r

    def paint(self, box, mask: np.ndarray, hu: float | np.ndarray, label: int | None = None) -> None:
        region = self.hu[box]
        region[mask] = hu if np.isscalar(hu) else hu[mask]
        if label is not None:
            self.label[box][mask] = label


def _tissue(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
    return float(rng.uniform(*lo_hi))


def _paint_body(c: Canvas, rng: np.random.Generator, hu_of: dict, a: float, b: float, fat: float, wall: float,
                fov: float, bottom: float, top: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Table, body outline (skin, fat, muscle wall) and the abdominal cavity's bowel and fat.
    Returns rho (normalised body radius, 1 at the skin), inner (inside the fat) and cavity."""
    u = rng.uniform
    X, Y, Z = c.x[:, None, None], c.y[None, :, None], c.z[None, None, :]
    nz = c.grid.shape[2]

    # Scanner table: a curved plate under the back.
    table_y = -b - u(5, 25)
    table = (Y < table_y) & (Y > table_y - u(8, 15)) & (np.abs(X) < fov * 0.45)
    c.hu[np.broadcast_to(table, c.hu.shape)] = u(100, 300)

    # Body outline: a superellipse whose width and depth change slowly along z, flatter at the back.
    width = a * (1 + 0.06 * np.sin((Z - bottom) / (top - bottom + 1) * math.pi + u(0, 3)))
    depth_front = b * (1 + 0.08 * _smooth_noise(rng, (1, 1, nz), 4))
    depth = np.where(Y > 0, depth_front, b * 0.9)
    p = u(2.0, 2.6)
    rho = (np.abs(X / width) ** p + np.abs(Y / depth) ** p) ** (1 / p)
    body = rho < 1.0
    skin_mm = 2.5
    inner = rho < 1.0 - fat / a
    cavity = rho < 1.0 - (fat + wall) / a
    c.hu[body] = u(-120, -85)  # subcutaneous fat, -120 to -85 HU
    c.hu[body & (rho > 1.0 - skin_mm / a)] = u(0, 40)  # skin
    c.hu[inner] = hu_of["muscle"]  # abdominal wall muscles
    # Abdominal cavity: mesenteric fat with bowel loops (soft tissue, fluid, gas, some contrast).
    shape = c.grid.shape
    loops = _smooth_noise(rng, shape, 14)
    gas = _smooth_noise(rng, shape, 18)
    contents = np.full(shape, u(-110, -80), dtype=np.float32)
    bowel = loops > u(-0.1, 0.25)
    contents[bowel] = u(15, 45)
    contents[bowel & (loops > 0.55)] = u(0, 25) if rng.random() < 0.6 else u(120, 300)
    contents[bowel & (gas > u(0.55, 0.8))] = -1000 + u(0, 150)
    c.hu = np.where(cavity, contents, c.hu)
    return rho, inner, cavity


def _paint_lungs(c: Canvas, rng: np.random.Generator, cavity: np.ndarray, a: float, b: float, vert_r: float,
                 dome_top: float) -> np.ndarray:
    """Lung bases above a diaphragm dome that is highest (dome_top, mm) in the middle and falls to
    the sides and the back, and the heart above it. Returns the dome height (X, Y, 1) in mm."""
    u = rng.uniform
    X, Y, Z = c.x[:, None, None], c.y[None, :, None], c.z[None, None, :]
    dome = dome_top - 25 * (X / a) ** 2 + 20 * np.clip(-Y / b, 0, 1) * -1
    lungs = cavity & (Z > dome) & (np.abs(X) > vert_r + 25)
    c.hu[lungs] = u(-900, -780)
    heart = c.blob((u(-40, -10), b * 0.35, dome.max() + 45), (70, 55, 50))
    if heart is not None:
        box, r = heart
        c.paint(box, (r < 1) & cavity[box], u(30, 60))
    return dome


def _paint_back(c: Canvas, rng: np.random.Generator, hu_of: dict, inner: np.ndarray, spine_y: float, vert_r: float,
                z_psoas: float) -> None:
    """Paraspinal and psoas muscles (the psoas widens below z_psoas, mm) and the spine: vertebral
    bodies with discs, canal and spinous processes, its axis at x = 0, y = spine_y."""
    u = rng.uniform
    X, Y, Z = c.x[:, None, None], c.y[None, :, None], c.z[None, None, :]
    shape = c.grid.shape
    for side in (-1, 1):
        para = (((X - side * 38) / 30) ** 2 + ((Y - (spine_y - vert_r - 35)) / 26) ** 2) < 1
        c.hu[para & inner] = hu_of["muscle"] + u(-5, 5)
        psoas_r = np.clip(6 + (z_psoas - Z) * 0.18, 0, 28)
        psoas = ((X - side * (vert_r + psoas_r + 2)) ** 2 + (Y - spine_y) ** 2) < psoas_r ** 2
        c.hu[psoas & inner] = hu_of["muscle"] + u(-5, 5)

    period = u(28, 34)
    disc = np.mod(Z - u(0, period), period) < u(5, 8)
    vb = ((X / vert_r) ** 2 + ((Y - spine_y) / (vert_r * 0.85)) ** 2) < 1
    cortex = vb & ~(((X / (vert_r - 2.5)) ** 2 + ((Y - spine_y) / (vert_r * 0.85 - 2.5)) ** 2) < 1)
    c.hu[np.broadcast_to(vb, shape)] = u(180, 300)
    c.hu[np.broadcast_to(cortex, shape)] = u(500, 800)
    c.hu[vb & disc] = u(70, 110)
    canal_y = spine_y - vert_r - 9
    ring = (X ** 2 + (Y - canal_y) ** 2 < 14 ** 2) & ~(X ** 2 + (Y - canal_y) ** 2 < 9 ** 2) & ~disc
    c.hu[ring] = u(300, 600)
    c.hu[np.broadcast_to(X ** 2 + (Y - canal_y) ** 2 < 9 ** 2, shape)] = u(10, 30)
    spinous = (np.abs(X) < 4) & (Y < canal_y - 12) & (Y > canal_y - 40) & ~disc
    c.hu[spinous] = u(300, 600)


def _paint_ribs(c: Canvas, rng: np.random.Generator, rho: np.ndarray, a: float, fat: float, wall: float,
                bottom: float, z_lowest: float) -> None:
    """Ribs: thin bands just inside the wall, falling from back to front, none at the front midline,
    none below about z_lowest (mm) at the back."""
    u = rng.uniform
    X, Y, Z = c.x[:, None, None], c.y[None, :, None], c.z[None, None, :]
    rib_band = (rho > 1.0 - (fat + wall * 0.6) / a) & (rho < 1.0 - fat / a) & (Z > bottom + u(40, 80))
    angle = np.arctan2(Y, X * np.sign(X + 1e-6))  # 0 at the side, +pi/2 front, -pi/2 back
    rib_z = Z + 45 * (angle / math.pi + 0.5)
    ribs = rib_band & (np.mod(rib_z, u(22, 28)) < u(6, 10)) & ~((np.abs(X) < 50) & (Y > 0))
    ribs &= Z > (z_lowest - 20 + 60 * np.clip(angle, 0, None))
    c.hu[ribs] = u(300, 700)


def _scan(c: Canvas, rng: np.random.Generator, psf_mm: tuple[float, float] = (0.6, 1.2),
          noise_hu: tuple[float, float] = (6, 25), grain: tuple[float, float] = (0.4, 0.9),
          slice_mm: float = 0.0) -> np.ndarray:
    """Scanner physics on the painted HU: partial-volume blur (PSF sigma psf_mm, and a slice
    profile of FWHM slice_mm along z when the grid is finer than the slices it stands for), then
    correlated noise (std noise_hu, correlation grain voxels). Returns int16 HU."""
    u = rng.uniform
    sig = u(*psf_mm)
    sigmas = [sig / s for s in c.grid.spacing]
    sigmas[2] = math.hypot(sigmas[2], slice_mm / 2.355 / c.grid.spacing[2])
    hu = ndimage.gaussian_filter(c.hu, sigmas, mode="nearest")
    noise = ndimage.gaussian_filter(rng.standard_normal(c.grid.shape, dtype=np.float32), u(*grain))
    noise *= u(*noise_hu) / max(float(noise.std()), 1e-6)
    hu = hu + noise
    return np.clip(np.round(hu), -1024, 3071).astype(np.int16)


def _clinical_spacing(rng: np.random.Generator) -> tuple[float, float, float]:
    inplane = rng.uniform(1.1, 1.6)
    return (inplane, inplane, float(rng.choice([1.5, 2.0, 2.5, 3.0, 5.0], p=[0.1, 0.2, 0.3, 0.3, 0.1])))


def make_phantom(seed: int, spacing: tuple[float, float, float] | None = None, slice_mm: float = 0.0
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthetic abdominal CT.

    Returns (hu, label, affine): hu (X, Y, Z) int16 in HU, label (X, Y, Z) uint8 in the project's
    map (0 background, 1 liver, 2 right kidney, 3 left kidney, 4 spleen), affine (4, 4) RAS, mm.
    spacing (mm) defaults to a random clinical one: 1.1-1.6 mm in-plane, 1.5-5 mm slices (finer
    grids only cost generation time: training resamples to its own spacing).
    """
    rng = np.random.default_rng(seed)
    u = rng.uniform
    phase = str(rng.choice(PROCEDURAL_PHASES, p=[0.25, 0.2, 0.55]))
    hu_of = {k: _tissue(rng, v) for k, v in PHASES[phase].items()}

    # Body habitus: half-width 135-185 mm, half-depth 95-140 mm, fat 8-40 mm.
    a, b = u(135, 185), u(95, 140)
    fat = u(8, 40)
    wall = u(8, 15)
    spine_y = -b * u(0.25, 0.38)
    vert_r = u(16, 21)

    # Organ anchor heights (z = 0 near L1/L2); the right kidney sits lower than the left.
    z_liver = u(55, 85)
    z_spleen = z_liver + u(-15, 10)
    z_kid_l = u(-5, 20)
    z_kid_r = z_kid_l - u(5, 25)

    top = z_liver + u(60, 110)
    bottom = min(z_kid_r, z_kid_l) - u(60, 140)
    if spacing is None:
        spacing = _clinical_spacing(rng)
    fov = max(2 * a, 2 * b) + u(30, 90)
    nx = int(round(fov / spacing[0]))
    ny = int(round(fov / spacing[1]))
    nz = max(8, int(round((top - bottom) / spacing[2])))
    body_cy = u(-10, 10)
    origin = (-fov / 2 + u(-15, 15), -fov / 2 + body_cy, bottom)
    grid = Grid((nx, ny, nz), tuple(float(s) for s in spacing), origin)
    c = Canvas(grid, rng)
    X, Y, Z = c.x[:, None, None], c.y[None, :, None], c.z[None, None, :]

    rho, inner, cavity = _paint_body(c, rng, hu_of, a, b, fat, wall, fov, bottom, top)
    dome = _paint_lungs(c, rng, cavity, a, b, vert_r, z_liver + u(35, 55))
    _paint_back(c, rng, hu_of, inner, spine_y, vert_r, z_kid_r)
    shape = grid.shape

    # Aorta (left-anterior of the spine) and IVC (right-anterior).
    aorta = ((X + u(10, 22)) ** 2 + (Y - (spine_y + vert_r + 12)) ** 2) < u(9, 13) ** 2
    c.hu[np.broadcast_to(aorta, shape)] = hu_of["aorta"]
    ivc = (((X - u(20, 30)) / 13) ** 2 + ((Y - (spine_y + vert_r + 15)) / 9) ** 2) < 1
    c.hu[np.broadcast_to(ivc, shape) & (Z < z_liver + 40)] = hu_of["vein"]

    # Stomach: left upper anterior, wall, fluid and an air cap (anterior, as the patient lies supine).
    st = c.blob((-a * u(0.2, 0.4), b * u(0.15, 0.4), z_liver - u(0, 30)), (u(35, 55), u(28, 40), u(35, 55)),
                _rotation(rng, (10, 10, 30)), wobble=0.1)
    if st is not None:
        box, r = st
        gy = Y[:, box[1]] if Y.shape[1] > 1 else Y
        c.paint(box, r < 1, u(30, 60))
        inside = r < 0.85
        fill = np.where(gy > b * 0.35 - u(0, 25), -1000.0 + u(0, 100), u(0, 30))
        fill = np.broadcast_to(fill, r.shape) if fill.shape != r.shape else fill
        if rng.random() < 0.25:
            fill = np.where(fill > -500, u(150, 350), fill)  # oral contrast
        c.paint(box, inside, fill)

    # Pancreas: an elongated soft-tissue band in front of the aorta, toward the splenic hilum.
    pan = c.blob((-u(10, 30), spine_y + vert_r + u(30, 45), z_kid_l + u(15, 35)), (u(55, 75), u(12, 18), u(12, 18)),
                 _rotation(rng, (10, 10, 25)), wobble=0.25, cells=6)
    if pan is not None:
        box, r = pan
        c.paint(box, r < 1, u(40, 110))

    # Liver, 1.2-2 L: a right lobe filling the right upper quadrant against the wall and the dome,
    # and a left lobe reaching across the midline in front of the stomach.
    liver_scale = u(0.88, 1.12)
    right_lobe = c.blob((a * u(0.35, 0.5), b * u(-0.05, 0.15), z_liver),
                        np.array([u(80, 95), u(80, 100), u(70, 85)]) * liver_scale,
                        _rotation(rng, (8, 8, 15)), wobble=0.12)
    left_lobe = c.blob((a * u(-0.15, 0.15), b * u(0.3, 0.5), z_liver + u(0, 25)),
                       np.array([u(55, 80), u(30, 40), u(35, 50)]) * liver_scale,
                       _rotation(rng, (10, 10, 20)), wobble=0.15)
    liver_hu = hu_of["liver"]
    for lobe in (right_lobe, left_lobe):
        if lobe is None:
            continue
        box, r = lobe
        mask = (r < 1) & cavity[box] & (Z[..., box[2]] < dome[box[0], box[1]] + 5)
        tex = liver_hu + 6 * _smooth_noise(rng, r.shape, 8)
        c.paint(box, mask, tex, LIVER)
    # Hepatic and portal vessels: bright in portal phase, dark in native; still labelled liver.
    vessels = _smooth_noise(rng, shape, 20)
    in_liver = c.label == LIVER
    vessel_hu = hu_of["vein"] if phase != "arterial" else liver_hu - 10
    c.hu[in_liver & (np.abs(vessels) < u(0.02, 0.05))] = vessel_hu

    # Gallbladder: fluid under the liver, front right (background).
    gb = c.blob((a * u(0.15, 0.3), b * u(0.25, 0.45), z_liver - u(35, 55)), (u(12, 18), u(14, 20), u(25, 40)),
                _rotation(rng, (20, 20, 20)), wobble=0.1)
    if gb is not None and rng.random() < 0.8:
        box, r = gb
        m = (r < 1) & cavity[box]
        c.paint(box, m, u(0, 25), 0)

    # Spleen, 0.1-0.3 L: left, posterior-lateral, a crescent tilted along the ribs.
    sp_c = np.array([-a * u(0.5, 0.62), b * u(-0.35, -0.1), z_spleen])
    sp_rot = _rotation(rng, (10, 15, 40)) @ _rotation(rng, (0, 0, 0))
    sp = c.blob(sp_c, np.array([u(18, 26), u(40, 55), u(45, 60)]) * u(0.85, 1.15), sp_rot, wobble=0.15)
    if sp is not None:
        box, r = sp
        hil = c.blob(sp_c + np.array([u(18, 25), u(5, 15), 0]), (u(15, 22), u(25, 35), u(30, 45)), sp_rot)
        mask = (r < 1) & cavity[box]
        if hil is not None:
            hbox, hr = hil
            notch = np.zeros(shape, dtype=bool)
            notch[hbox] = hr < 1
            mask &= ~notch[box]
        tex = hu_of["spleen"] + (25 if phase == "arterial" else 5) * _smooth_noise(rng, r.shape, 7)
        c.paint(box, mask, tex, SPLEEN)

    # Kidneys, 0.12-0.2 L each: posterior beside the spine, upper pole medial and posterior,
    # hilum facing anteromedially; cortex, medulla, the hilar notch of sinus fat (background, as in
    # the real maps: docs/phantom.md, "Labelling conventions") and perirenal fat (2-12 mm, -110 to -70 HU).
    for side, label, zc in ((1, RIGHT_KIDNEY, z_kid_r), (-1, LEFT_KIDNEY, z_kid_l)):
        center = np.array([side * (vert_r + u(38, 52)), spine_y + u(-5, 15), zc])
        radii = np.array([u(22, 30), u(22, 28), u(48, 60)])
        tilt = np.radians(u(10, 25))
        yaw = np.radians(u(20, 45))
        coronal = np.array([[math.cos(tilt), 0, side * math.sin(tilt)], [0, 1, 0],
                            [-side * math.sin(tilt), 0, math.cos(tilt)]])
        axial = np.array([[math.cos(yaw), side * math.sin(yaw), 0], [-side * math.sin(yaw), math.cos(yaw), 0],
                          [0, 0, 1]])
        rot = coronal @ axial
        kid = c.blob(center, radii, rot, wobble=0.06)
        if kid is None:
            continue
        box, r = kid
        capsule = c.blob(center, radii + u(2, 12), rot, wobble=0.1)
        if capsule is not None:
            cbox, cr = capsule
            other_kidney = LEFT_KIDNEY if label == RIGHT_KIDNEY else RIGHT_KIDNEY
            m = (cr < 1) & cavity[cbox] & (c.hu[cbox] < 150) & (c.label[cbox] != other_kidney)
            c.paint(cbox, m, u(-110, -70), 0)
        hilum_dir = rot @ np.array([-side, 0.0, 0.0])
        sinus = c.blob(center + hilum_dir * radii[0] * 0.7, radii * np.array([0.45, 0.45, 0.5]), rot, wobble=0.1)
        mask = r < 1
        cortex_hu = hu_of["cortex"] + 10 * _smooth_noise(rng, r.shape, 6)
        c.paint(box, mask, cortex_hu, label)
        c.paint(box, mask & (r < u(0.65, 0.8)), hu_of["medulla"])
        if sinus is not None:
            sbox, sr = sinus
            c.paint(sbox, (sr < 1) & (c.label[sbox] == label), u(-90, -40), 0)

    _paint_ribs(c, rng, rho, a, fat, wall, bottom, z_kid_l)
    return _scan(c, rng, slice_mm=slice_mm), c.label, grid.affine


def reorient_for_writing(hu: np.ndarray, label: np.ndarray, affine: np.ndarray, code: str
                         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """RAS arrays and affine as stored in another orientation ("RAS", "LPS", "LAS"...)."""
    import nibabel as nib
    from nibabel import orientations as ornt

    tf = ornt.ornt_transform(ornt.axcodes2ornt("RAS"), ornt.axcodes2ornt(tuple(code)))
    hu2 = ornt.apply_orientation(hu, tf)
    label2 = ornt.apply_orientation(label, tf)
    aff2 = affine @ ornt.inv_ornt_aff(tf, hu.shape)
    assert nib.aff2axcodes(aff2) == tuple(code)
    return np.ascontiguousarray(hu2), np.ascontiguousarray(label2), aff2


def write_case(out_dir: Path, name: str, seed: int, spacing: tuple[float, float, float] | None = None) -> None:
    """Writes imagesTr/<name>_0000.nii.gz (int16 HU) and labelsTr/<name>.nii.gz (uint8)."""
    from utils import save_nifti

    hu, label, affine = make_phantom(seed, spacing)
    code = ("RAS", "LPS", "LAS")[seed % 3]
    hu, label, affine = reorient_for_writing(hu, label, affine, code)
    save_nifti(out_dir / "imagesTr" / f"{name}_0000.nii.gz", hu, affine)
    save_nifti(out_dir / "labelsTr" / f"{name}.nii.gz", label, affine)


def write_dataset(out_dir: Path, n_cases: int, seed: int = 0, workers: int = 1, progress: bool = True,
                  spacing: tuple[float, float, float] | None = None) -> None:
    """Writes n_cases phantoms as an nnU-Net-style dataset (imagesTr/, labelsTr/, dataset.json).
    Case i uses seed * 100003 + i, so a folder is reproducible. Written into a temporary folder and
    renamed at the end, so an interrupted run never leaves a half dataset."""
    import shutil
    import tempfile
    from concurrent.futures import ProcessPoolExecutor

    from tqdm import tqdm

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".synthetic-", dir=out_dir.parent))
    try:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        names = [f"phantom_{i:03d}" for i in range(n_cases)]
        seeds = [seed * 100003 + i for i in range(n_cases)]
        bar = tqdm(total=n_cases, desc="phantoms", unit="case", disable=not progress)
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                for _ in pool.map(write_case, [tmp] * n_cases, names, seeds, [spacing] * n_cases):
                    bar.update()
        else:
            for name, s in zip(names, seeds):
                write_case(tmp, name, s, spacing)
                bar.update()
        bar.close()
        meta = {
            "name": "synthetic-abdomen",
            "description": "Procedural abdominal CT phantoms (phantom.py), reproducible from the seed.",
            "seed": seed,
            "channel_names": {"0": "CT"},
            "labels": {name: value for value, name in LABELS.items()},
            "numTraining": n_cases,
            "file_ending": ".nii.gz",
        }
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
