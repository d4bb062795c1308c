"""The organs in 3D: an orbiting MP4, a still PNG, an interactive web page and per-organ meshes
from a label map.

    python visualize.py --input pred.nii.gz --output pred.mp4
    python visualize.py --input pred.nii.gz --html pred.html
    python visualize.py --input pred.nii.gz --reference label.nii.gz --output compare.mp4
    python visualize.py --input pred.nii.gz --ct ct.nii.gz --output context.mp4 --png context.png
    python visualize.py --input seg.nii.gz --label-map totalseg --png still.png --angle 30
    python visualize.py --input pred.nii.gz --mesh meshes/ --mesh-format ply

Each organ of the label map (0 background, 1 liver, 2 right kidney, 3 left kidney, 4 spleen; other
maps through --label-map) becomes a closed surface: its mask is block-averaged to about --voxel-mm,
padded by one voxel (so organs cut by the field of view close too), cut by marching cubes at 0.5 and
mapped through the full affine to world RAS millimetres, so proportions and sides are true for any
orientation, spacing or obliquity; it is then Taubin-smoothed, which keeps the volume (within 1% of
the voxel count on real label maps). Only the copy that is drawn is decimated.
The camera orbits around the superior-inferior axis, starting from the front with the head up: the
patient's right on the viewer's left, as a radiologist looks at a patient. The legend gives each
organ's volume in mL from its voxel count. Rendering is off screen (EGL or OSMesa, no display
needed); the video is H.264 yuv420p, which browsers play. A mask with no organ at all (a scan
without them) gives an empty scene with a note, not an error.

The web page (--html) is VTK's own web export: the scene serialized by trame-vtk for vtk.js's
OfflineLocalView, which trame-vtk ships with vtk.js inlined, so the single file works offline in
any browser with WebGL (drag to rotate, wheel to zoom). A small overlay adds the legend (names,
volumes) with a checkbox per organ; '#hide=liver,spleen' after the file's URL opens it with those
organs hidden.

Meshes (--mesh) are in world RAS millimetres and say so: SPACE=RAS in the STL header and in a
PLY/OBJ comment, the tag 3D Slicer reads; without it Slicer (4.11 and later) takes all three
formats as LPS and would mirror them front-back and left-right.
"""

from __future__ import annotations

import argparse
import html
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from utils import (
    LABELS,
    ORGANS,
    UserError,
    atomic_write,
    canonical_transform,
    check_writable_folder,
    dice_per_organ,
    label_counts,
    load_nifti,
    reorient,
    run_cli,
    spacing_of,
)

# Fixed per organ, so that every video and still of the project reads the same (RGB, 0..1).
COLORS: dict[str, tuple[float, float, float]] = {
    "liver": (0.55, 0.16, 0.12),  # dark red-brown
    "right_kidney": (0.95, 0.66, 0.16),  # amber
    "left_kidney": (0.13, 0.60, 0.55),  # teal
    "spleen": (0.50, 0.28, 0.72),  # purple
}
BODY_COLOR = (0.92, 0.76, 0.66)
BONE_COLOR = (0.93, 0.91, 0.83)
BACKGROUND, BACKGROUND_TOP = "#d5dbe3", "white"
AXES_VIEWPORT = (0.0, 0.0, 0.18, 0.3)  # the R/A/S marker, lower left of the pane
BODY_HU, BONE_HU = -300.0, 250.0  # isosurfaces of the --ct context
CT_MM = 3.0  # the --ct context is block-averaged to about this voxel size
# Edge smoothing, and its cost per 1280x720 frame with software OpenGL (llvmpipe, 2 cores) over
# ~0.15 s without: fxaa +0.2 s (set on the renderers directly: pyvista would swap it for far
# costlier SSAA under EGL), msaa (4 samples) +0.35 s.
ANTIALIAS = ("fxaa", "msaa", "none")
MAX_TRIANGLES = 40_000  # per organ after decimation: smooth at 1080p, fast to draw
ALIASES = {"kidney_right": "right_kidney", "kidney_left": "left_kidney"}
NO_ORGAN = "no organ in the mask"


def pretty(organ: str) -> str:
    return organ.replace("_", " ")


# ---------------------------------------------------------------------------------------------
# Label maps and surfaces


def parse_organs(text: str) -> list[str]:
    """'liver,spleen' -> ['liver', 'spleen'] in the label order; also takes 'right-kidney',
    'kidney_right' (TotalSegmentator's names) and any case."""
    names = []
    for raw in text.split(","):
        name = raw.strip().lower().replace("-", "_").replace(" ", "_")
        if not name:
            continue
        name = ALIASES.get(name, name)
        if name not in ORGANS:
            raise UserError(f"--organs: unknown organ {raw.strip()!r}; choose from {','.join(ORGANS)}")
        names.append(name)
    if not names:
        raise UserError(f"--organs is empty; name one or more of {','.join(ORGANS)}")
    return [o for o in ORGANS if o in names]


def read_labels(path: str | Path, label_map: str, what: str = "label map") -> tuple[np.ndarray, np.ndarray]:
    """A label map file -> (labels (X, Y, Z) uint8 in our map, affine (4, 4) to world RAS mm).
    Non-integer values (an image, a probability map) or values outside the map are a UserError."""
    from dataset import remap_labels

    array, affine = load_nifti(path, what)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise UserError(f"{path}: voxels of type {array.dtype} cannot be labels; pass an integer label map")
    if array.dtype == np.uint8 and label_map == "identity" and int(array.max()) <= 4:
        return array, affine  # already ours: skips a sort of the whole volume
    lowest = array.min()
    if lowest < 0:
        raise UserError(f"{path}: values go down to {lowest:g}, as in a CT (HU), never in a label map; pass the "
                        f"segmentation (0 background, 1 liver, 2 right kidney, 3 left kidney, 4 spleen)")
    return remap_labels(array, label_map, path), affine


def voxel_volume_ml(affine: np.ndarray) -> float:
    return abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0


def organ_volumes(labels: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """Volume (mL) of each organ: voxel count x voxel volume."""
    counts = np.bincount(labels.ravel(), minlength=len(LABELS))
    return {LABELS[v]: float(counts[v]) * voxel_volume_ml(affine) for v in range(1, len(LABELS))}


def _translate(affine: np.ndarray, offset: Iterable[int]) -> np.ndarray:
    """The affine of a crop starting at voxel offset."""
    shift = np.eye(4)
    shift[:3, 3] = list(offset)
    return np.asarray(affine, dtype=np.float64) @ shift


def block_mean(volume: np.ndarray, factors: Iterable[int]) -> np.ndarray:
    """(X, Y, Z) -> float32 mean of each fx*fy*fz block; blocks cut by the volume's far edges
    average the voxels they hold."""
    f = [int(v) for v in factors]
    if f == [1, 1, 1]:
        return volume.astype(np.float32)
    shape = [math.ceil(n / k) * k for n, k in zip(volume.shape, f)]
    padded = np.zeros(shape, dtype=np.float32)
    padded[tuple(slice(0, n) for n in volume.shape)] = volume
    blocks = padded.reshape(shape[0] // f[0], f[0], shape[1] // f[1], f[1], shape[2] // f[2], f[2])
    sums = blocks.sum(axis=(1, 3, 5), dtype=np.float32)
    counts = [np.minimum(k, n - k * np.arange(m // k)) for n, k, m in zip(volume.shape, f, shape)]
    return sums / (counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :])


def block_factors(affine: np.ndarray, voxel_mm: float) -> np.ndarray:
    """Whole-voxel block sizes that bring the grid to about voxel_mm (1 where it is coarser)."""
    if voxel_mm <= 0:
        return np.ones(3, dtype=int)
    return np.maximum(1, np.round(voxel_mm / spacing_of(affine))).astype(int)


def isosurface(volume: np.ndarray, level: float, affine: np.ndarray, factors: Iterable[int] = (1, 1, 1),
               fill: float = 0.0):
    """Closed triangle surface (pyvista.PolyData, world mm, outward normals) where volume crosses
    level. volume (X, Y, Z) float is a block-averaged grid: its voxel b covers input voxels
    f*b .. f*b+f-1 of the grid that affine describes. It is padded with fill (the outside) by one
    voxel so that surfaces cut by the edge close. None when nothing crosses level."""
    import pyvista as pv
    from skimage.measure import marching_cubes

    f = np.asarray(list(factors), dtype=np.float64)
    padded = np.pad(volume.astype(np.float32, copy=False), 1, constant_values=fill)
    if not (padded.min() < level < padded.max()):
        return None
    if np.any(padded == level):
        # Block means often sit exactly on 0.5: such voxels make zero-area triangles, and dropping
        # those leaves holes. A level a hair lower keeps the surface closed and manifold.
        level -= 1e-3 * float(padded.max() - padded.min())
    verts, faces, _, _ = marching_cubes(padded, level)
    if len(faces) == 0:
        return None
    ijk = f * (verts - 1.0) + (f - 1.0) / 2.0
    xyz = ijk @ np.asarray(affine)[:3, :3].T + np.asarray(affine)[:3, 3]
    a, b, c = (xyz[faces[:, k]] for k in range(3))
    if np.einsum("ij,ij->", a, np.cross(b, c)) < 0:  # a mirroring affine turns the faces inside out
        faces = faces[:, ::-1]
    return pv.PolyData.from_regular_faces(xyz, faces)


def finish_mesh(mesh, smooth_iter: int):
    """Taubin smoothing (no shrinkage, keeps the topology) and point normals."""
    if smooth_iter > 0:
        mesh = mesh.smooth_taubin(n_iter=smooth_iter, pass_band=0.02)
    return mesh.compute_normals(split_vertices=False, consistent_normals=False, auto_orient_normals=False)


def display_mesh(mesh, max_triangles: int = MAX_TRIANGLES):
    """A lighter copy to draw: decimated to max_triangles. Quadric decimation may leave a stray
    non-manifold edge, harmless on screen, which is why exported meshes are never decimated."""
    if mesh.n_cells <= max_triangles:
        return mesh
    mesh = mesh.decimate(1.0 - max_triangles / mesh.n_cells, volume_preservation=True)
    return mesh.compute_normals(split_vertices=False, consistent_normals=False, auto_orient_normals=False)


def mask_surface(mask: np.ndarray, affine: np.ndarray, voxel_mm: float = 1.2, smooth_iter: int = 50):
    """Closed, manifold, smoothed surface (pyvista.PolyData, world RAS mm, outward point normals)
    of a binary mask (X, Y, Z) on the grid of affine (4, 4), or None when the mask is empty. Every
    connected piece is kept, each closed."""
    from scipy import ndimage

    boxes = ndimage.find_objects(mask.astype(np.uint8, copy=False))
    if not boxes or boxes[0] is None:
        return None
    box = boxes[0]
    factors = block_factors(affine, voxel_mm)
    frac = block_mean(mask[box], factors)
    mesh = isosurface(frac, 0.5, _translate(affine, [s.start for s in box]), factors)
    return None if mesh is None else finish_mesh(mesh, smooth_iter)


def organ_surfaces(labels: np.ndarray, affine: np.ndarray, organs: list[str], voxel_mm: float,
                   smooth_iter: int) -> dict[str, object]:
    """{organ: surface} for each listed organ present in labels (X, Y, Z) uint8."""
    from scipy import ndimage

    boxes = ndimage.find_objects(labels, max_label=len(ORGANS))
    out = {}
    for organ in organs:
        value = ORGANS.index(organ) + 1
        box = boxes[value - 1]
        if box is None:
            continue
        mesh = mask_surface(labels[box] == value, _translate(affine, [s.start for s in box]), voxel_mm, smooth_iter)
        if mesh is not None:
            out[organ] = mesh
    return out


def context_surfaces(ct_path: str | Path, smooth_iter: int) -> list[tuple[str, object]]:
    """[('body', skin surface at -300 HU), ('bone', +250 HU)] from a CT, on a ~3 mm grid. The
    body is the largest connected piece (not the table), its cavities filled slice by slice."""
    from scipy import ndimage

    hu, affine = load_nifti(ct_path, "CT")
    if not np.issubdtype(hu.dtype, np.number) or hu.dtype == np.bool_:
        raise UserError(f"{ct_path}: voxels of type {hu.dtype} are not HU; pass the CT image")
    factors = block_factors(affine, CT_MM)
    if np.issubdtype(hu.dtype, np.floating):
        bad = ~np.isfinite(hu)
        if bad.any():  # as infer.py does: the scan stays usable, the damaged voxels count as air
            print(f"warning: {ct_path}: {int(bad.sum())} NaN or infinite voxels, treated as air (-1024 HU)",
                  file=sys.stderr)
            hu = np.where(bad, np.float32(-1024), hu)
    coarse = block_mean(hu.astype(np.float32, copy=False), factors)
    if coarse.max() < BODY_HU or coarse.min() > BODY_HU:
        raise UserError(f"{ct_path}: no body surface at {BODY_HU:.0f} HU (values {coarse.min():.0f}.."
                        f"{coarse.max():.0f}); is this a CT in HU?")
    body, n = ndimage.label(coarse > BODY_HU)
    if n > 1:
        body = body == (np.argmax(np.bincount(body.ravel())[1:]) + 1)
    body = body > 0
    si_axis = int(np.argmax(np.abs(np.asarray(affine)[2, :3])))
    for k in range(body.shape[si_axis]):
        index = [slice(None)] * 3
        index[si_axis] = k
        body[tuple(index)] = ndimage.binary_fill_holes(body[tuple(index)])
    out = []
    skin = isosurface(ndimage.gaussian_filter(body.astype(np.float32), 1.0), 0.5, affine, factors)
    if skin is not None:
        out.append(("body", display_mesh(finish_mesh(skin, smooth_iter), 60_000)))
    bone = isosurface(ndimage.gaussian_filter(coarse, 0.6), BONE_HU, affine, factors, fill=float(coarse.min()))
    if bone is not None:
        sizes = np.bincount(bone.connectivity("all").point_data["RegionId"])
        keep = np.flatnonzero(sizes >= 200)  # drops specks: calcifications, contrast, noise
        if keep.size:
            bone = bone.connectivity("specified", region_ids=keep)
            out.append(("bone", display_mesh(finish_mesh(bone, smooth_iter), 120_000)))
    return out


# ---------------------------------------------------------------------------------------------
# Rendering


@dataclass
class Pane:
    """One viewport: a title, organ surfaces with their legend lines, context surfaces, and a
    note shown in the middle when there is nothing to see."""

    title: str
    organs: dict[str, object]
    legend: list[tuple[str, str, tuple[float, float, float]]]
    context: list[tuple[str, object]] = field(default_factory=list)
    note: str = ""


def _use_headless_gl() -> None:
    """Picks VTK's OpenGL window on Linux without a display. VTK would try X first (printing a
    warning), then EGL, then OSMesa, and crash outright when none works: EGL is chosen when its
    library and a vendor driver load, else OSMesa, else a clear error."""
    if not sys.platform.startswith("linux") or os.environ.get("VTK_DEFAULT_OPENGL_WINDOW"):
        return
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return
    import ctypes
    import glob

    def loads(*names: str) -> bool:
        for name in names:
            try:
                ctypes.CDLL(name)
                return True
            except OSError:
                pass
        return False

    vendors = glob.glob("/usr/share/glvnd/egl_vendor.d/*.json") + glob.glob("/etc/glvnd/egl_vendor.d/*.json")
    if loads("libEGL.so.1") and (vendors or loads("libEGL_mesa.so.0", "libEGL_nvidia.so.0")):
        os.environ["VTK_DEFAULT_OPENGL_WINDOW"] = "vtkEGLRenderWindow"
    elif loads("libOSMesa.so.8", "libOSMesa.so.6", "libOSMesa.so"):
        os.environ["VTK_DEFAULT_OPENGL_WINDOW"] = "vtkOSMesaRenderWindow"
    else:
        raise UserError("no display and no off-screen OpenGL (EGL or OSMesa) to render with; install one: "
                        "apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri (Debian/Ubuntu), or libosmesa6")


def legend_font(pane_px: tuple[int, int]) -> int:
    """Legend text height (pixels) for a pane of (width, height) pixels."""
    return max(9, round(min(0.03 * pane_px[1], 0.026 * pane_px[0])))


def legend_rect(n_lines: int, value_chars: int, pane_px: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel box (x0, y0, x1, y1), origin at the pane's lower left, of a legend of n_lines whose
    value column is value_chars wide, in the pane's upper right corner."""
    font = legend_font(pane_px)
    char = 0.58 * font  # a generous mean glyph width of Arial
    width = font * 3.2 + char * (max(len(pretty(o)) for o in ORGANS) + value_chars)
    height = n_lines * font * 1.5 + font
    x1, y1 = pane_px[0] - font // 2, pane_px[1] - font // 2
    return round(x1 - width), round(y1 - height), x1, y1


def _add_text(plotter, text: str, x: float, y: float, font: int, color: str = "#202326", align: str = "left",
              bold: bool = False) -> None:
    """Text whose left end (align 'left'), right end ('right') or middle ('centre') and vertical
    middle sit at pixel (x, y) of the pane."""
    from vtkmodules.vtkRenderingCore import vtkTextActor

    actor = vtkTextActor()
    actor.SetInput(text)
    prop = actor.GetTextProperty()
    prop.SetFontFamilyToArial()
    prop.SetFontSize(font)
    prop.SetBold(bold)
    prop.SetColor(*_rgb(color))
    prop.SetVerticalJustificationToCentered()
    if align == "right":
        prop.SetJustificationToRight()
    elif align == "centre":
        prop.SetJustificationToCentered()
    actor.SetPosition(x, y)
    plotter.add_actor(actor, reset_camera=False, pickable=False)


def _add_box(plotter, box: tuple[float, float, float, float], color, opacity: float = 1.0) -> None:
    """A filled rectangle (x0, y0, x1, y1) in pixels of the pane, drawn over the scene."""
    import pyvista as pv
    from vtkmodules.vtkRenderingCore import vtkActor2D, vtkPolyDataMapper2D

    x0, y0, x1, y1 = box
    corners = np.array([[x0, y0, 0], [x1, y0, 0], [x1, y1, 0], [x0, y1, 0]], dtype=np.float64)
    mapper = vtkPolyDataMapper2D()
    mapper.SetInputData(pv.PolyData(corners, faces=[4, 0, 1, 2, 3]))
    actor = vtkActor2D()
    actor.SetMapper(mapper)
    actor.GetProperty().SetColor(*_rgb(color))
    actor.GetProperty().SetOpacity(opacity)
    plotter.add_actor(actor, reset_camera=False, pickable=False)


def _rgb(color) -> tuple[float, float, float]:
    import pyvista as pv

    return tuple(pv.Color(color).float_rgb)


def add_legend(plotter, lines: list[tuple[str, str, tuple[float, float, float]]], pane_px: tuple[int, int]) -> None:
    """A legend of (organ, value text, colour) lines: a colour square, the name, the value
    right-aligned; in the pane's upper right corner, on a translucent white card."""
    font = legend_font(pane_px)
    x0, y0, x1, y1 = legend_rect(len(lines), max(len(v) for _, v, _ in lines), pane_px)
    _add_box(plotter, (x0, y0, x1, y1), "white", 0.82)
    for k, (name, value, color) in enumerate(lines):
        y = y1 - font - k * font * 1.5
        _add_box(plotter, (x0 + font * 0.6, y - font * 0.4, x0 + font * 1.4, y + font * 0.4), color)
        _add_text(plotter, name, x0 + font * 1.8, y, font)
        _add_text(plotter, value, x1 - font * 0.6, y, font, align="right")


def make_plotter(panes: list[Pane], size: tuple[int, int], antialias: str = "fxaa", axes: bool = True):
    """An off-screen pyvista.Plotter with one viewport per pane, side by side, sharing one camera;
    axes adds the R/A/S marker."""
    _use_headless_gl()
    import pyvista as pv

    pv.OFF_SCREEN = True
    theme = pv.themes.Theme()
    theme.multi_samples = 4 if antialias == "msaa" else 0
    # One light that follows the camera, a little above it: software OpenGL shades each pixel once
    # per light, and pyvista's default five-light kit costs ~70% more per frame.
    plotter = pv.Plotter(off_screen=True, window_size=list(size), shape=(1, len(panes)), border=False,
                         theme=theme, lighting="none")
    for k, pane in enumerate(panes):
        plotter.subplot(0, k)
        plotter.set_background(BACKGROUND, top=BACKGROUND_TOP)
        plotter.add_light(pv.Light(position=(0.0, 0.35, 1.0), light_type="camera light"), only_active=True)
        # Translucency is blended without depth peeling: with multisampling under EGL, depth peeling
        # drops translucent surfaces altogether. Only the body's far side is drawn, a backdrop that
        # outlines the body without veiling the organs' colours.
        for name, mesh in pane.context:
            if name == "body":
                plotter.add_mesh(mesh, color=BODY_COLOR, opacity=0.25, smooth_shading=True, culling="front",
                                 ambient=0.3)
            else:
                plotter.add_mesh(mesh, color=BONE_COLOR, opacity=0.5, smooth_shading=True, specular=0.2)
        for organ, mesh in pane.organs.items():
            plotter.add_mesh(display_mesh(mesh), color=COLORS[organ], smooth_shading=True, specular=0.35,
                             specular_power=20, ambient=0.12, diffuse=0.85)
        pane_px = (size[0] // len(panes), size[1])
        font = legend_font(pane_px)
        _add_text(plotter, pane.title, font // 2, size[1] - font, round(font * 1.15), bold=True)
        if pane.legend:
            add_legend(plotter, pane.legend, pane_px)
        if pane.note:
            _add_text(plotter, pane.note, pane_px[0] / 2, pane_px[1] / 2, font, align="centre")
        if axes:
            plotter.add_axes(xlabel="R", ylabel="A", zlabel="S", line_width=4, viewport=AXES_VIEWPORT,
                             interactive=False, label_size=(0.35, 0.14), color="#202326")
        plotter.renderer.SetUseFXAA(antialias == "fxaa")
    if len(panes) > 1:
        plotter.link_views()
    return plotter


@dataclass
class Orbit:
    """A camera circling the superior-inferior (z) axis through centre at distance (mm).
    Azimuth 0 looks from the front (anterior, +y); 90 from the patient's left (-x)."""

    centre: np.ndarray
    distance: float
    reach: float  # radius (mm) of a sphere around centre holding the scene
    elevation: float = 0.0
    top: float = 0.0  # fraction of the pane's height kept free at the top (title and legend)

    def place(self, plotter, azimuth_deg: float) -> None:
        az, el = math.radians(azimuth_deg), math.radians(self.elevation)
        direction = np.array([-math.sin(az) * math.cos(el), math.cos(az) * math.cos(el), math.sin(el)])
        for renderer in plotter.renderers:
            cam = renderer.camera
            cam.focal_point = tuple(self.centre)
            cam.position = tuple(self.centre + self.distance * direction)
            cam.up = (0.0, 0.0, 1.0)
            cam.SetWindowCenter(0.0, self.top)  # centres the scene in the free part of the pane
            cam.clipping_range = (max(self.distance - 1.5 * self.reach, 1.0), self.distance + 1.5 * self.reach)


def fit_orbit(meshes: list, size: tuple[int, int], panes: int, elevation: float, top: float = 0.0,
              view_angle: float = 30.0, fill: float = 0.9) -> Orbit:
    """An orbit whose distance keeps every mesh in view at every azimuth: the scene seen as a
    cylinder about the z axis, fitted to fill (fraction) of the pane's width or of its height below
    the top fraction kept free. With no mesh (an empty scene), a 10 cm sphere at the origin."""
    if not meshes:
        return Orbit(np.zeros(3), 400.0, 100.0, elevation, top)
    points = np.concatenate([np.asarray(m.points) for m in meshes])
    lo, hi = points.min(0), points.max(0)
    centre = (lo + hi) / 2.0
    radius = float(np.sqrt(((points[:, :2] - centre[:2]) ** 2).sum(1)).max())
    half_height = float(np.abs(points[:, 2] - centre[2]).max())
    half_height = half_height * math.cos(math.radians(elevation)) + radius * abs(math.sin(math.radians(elevation)))
    tan_v = math.tan(math.radians(view_angle) / 2.0) * fill
    aspect = size[0] / panes / size[1]
    distance = radius + max(half_height / (tan_v * (1.0 - top)), radius / (tan_v * aspect))
    reach = float(np.sqrt(((points - centre) ** 2).sum(1)).max())
    return Orbit(centre, distance, reach, elevation, top)


def render_frames(plotter, orbit: Orbit, azimuths: Iterable[float]) -> Iterator[np.ndarray]:
    """(H, W, 3) uint8 RGB frames, one per azimuth (degrees)."""
    for azimuth in azimuths:
        orbit.place(plotter, azimuth)
        plotter.render()  # screenshot() alone would return the previous camera's frame
        yield np.ascontiguousarray(plotter.screenshot(return_img=True)[..., :3])


def write_video(path: Path, frames: Iterable[np.ndarray], size: tuple[int, int], fps: float) -> None:
    """H.264 MP4 (yuv420p, +faststart: plays in browsers while loading), written atomically."""
    import imageio_ffmpeg

    def write(tmp: Path) -> None:
        writer = imageio_ffmpeg.write_frames(
            str(tmp), size, fps=fps, codec="libx264", pix_fmt_out="yuv420p", quality=None, macro_block_size=2,
            ffmpeg_log_level="error", output_params=["-crf", "20", "-preset", "veryfast", "-movflags", "+faststart"])
        writer.send(None)
        try:
            for frame in frames:
                writer.send(frame)
        finally:
            writer.close()

    atomic_write(path, write)


def write_png(path: Path, image: np.ndarray) -> None:
    from PIL import Image

    atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG", optimize=True))


def write_mesh(path: Path, mesh, fmt: str, organ: str) -> None:
    """One organ's surface in world RAS mm, tagged SPACE=RAS where 3D Slicer looks for it."""
    tag = f"abdomen-vnet {organ}, world RAS mm. SPACE=RAS"

    def write(tmp: Path) -> None:
        if fmt == "obj":
            write_obj(tmp, mesh, tag)
            return
        from vtkmodules.vtkIOGeometry import vtkSTLWriter
        from vtkmodules.vtkIOPLY import vtkPLYWriter

        writer = vtkSTLWriter() if fmt == "stl" else vtkPLYWriter()
        if fmt == "stl":
            writer.SetHeader(tag)
        else:
            writer.AddComment(tag)
        writer.SetFileTypeToBinary()
        writer.SetFileName(str(tmp))
        writer.SetInputData(mesh)
        if writer.Write() != 1:
            raise UserError(f"{path}: writing the mesh failed; check the disk space and permissions")

    atomic_write(path, write)


def write_obj(path: Path, mesh, comment: str) -> None:
    """Wavefront OBJ with vertex normals; comment goes on the first line, where readers
    (vtkOBJReader, hence Slicer) find it."""
    points = np.asarray(mesh.points, dtype=np.float64)
    normals = np.asarray(mesh.point_data["Normals"], dtype=np.float64)
    faces = mesh.regular_faces + 1
    with open(path, "w") as f:
        f.write(f"# {comment}\n")
        np.savetxt(f, points, fmt="v %.4f %.4f %.4f")
        np.savetxt(f, normals, fmt="vn %.5f %.5f %.5f")
        np.savetxt(f, np.repeat(faces, 2, axis=1), fmt="f %d//%d %d//%d %d//%d")


# ---------------------------------------------------------------------------------------------
# Web page: vtk.js's OfflineLocalView with the scene inlined, as trame-vtk's export writes it, and
# an overlay per pane (title, legend with a checkbox per organ, note). Organ actors are found in
# the browser by their fixed colour, which is all the exported scene says about them.

# Addresses that a page loads by itself: src/href attributes (also set from script), CSS url(),
# script imports and fetches. Links in comments and in text are not loaded, so do not count.
_LOADED_URL = re.compile(
    r"""(?:\b(?:src|href|action|poster|data)\s*=\s*|\b(?:url|import|fetch)\s*\(\s*|\bfrom\s*"""
    r"""|setAttribute\(\s*["'](?:src|href)["']\s*,\s*)["'`]?\s*((?:https?:)?//[^\s"'`)<>]+)""", re.IGNORECASE)

HTML_STYLE = """<style>
  .abv { position: fixed; z-index: 1; font: 14px/1.5 system-ui, sans-serif; color: #202326; }
  .abv-card { background: rgba(255, 255, 255, 0.82); border-radius: 6px; padding: 6px 10px; }
  .abv-card label { display: flex; align-items: center; gap: 7px; cursor: pointer; }
  .abv-swatch { width: 13px; height: 13px; border-radius: 3px; }
  .abv-value { margin-left: auto; padding-left: 18px; font-variant-numeric: tabular-nums; }
  .abv-note { top: 50%; transform: translate(-50%, -50%); font-size: 18px; }
</style>"""

HTML_SCRIPT = """<script>
(() => {
  const boxes = [...document.querySelectorAll("input.abv-organ")];
  const hide = new URLSearchParams(location.hash.slice(1)).get("hide");
  for (const box of boxes) {
    if (hide && hide.split(",").includes(box.dataset.organ)) box.checked = false;
    box.color = box.dataset.color.split(",").map(Number);
  }
  // Gives each organ actor its checkbox's visibility, rendering only on a change. It runs on every
  // click and a few times a second: the scene loads asynchronously, and loading sets visibilities.
  function apply() {
    const view = window.global && window.global.renderWindow;
    if (!view) return;
    let changed = false;
    for (const renderer of view.getRenderers()) {
      const pane = Math.round(renderer.getViewport()[0] * PANES);
      for (const actor of renderer.getActors()) {
        const rgb = actor.getProperty().getDiffuseColor();
        const box = boxes.find((b) => +b.dataset.pane === pane && b.color.every((v, i) => Math.abs(v - rgb[i]) < 1e-3));
        if (box && Boolean(actor.getVisibility()) !== box.checked) {
          actor.setVisibility(box.checked);
          changed = true;
        }
      }
    }
    if (changed) view.render();
  }
  for (const box of boxes) box.addEventListener("change", apply);
  setInterval(apply, 250);
})();
</script>"""


def loaded_urls(page: str) -> list[str]:
    """The http(s) addresses that an HTML page would fetch by itself while loading."""
    return _LOADED_URL.findall(page)


def scene_archive(plotter) -> bytes:
    """The plotter's scene (renderers with their viewports, the camera, actors, meshes with their
    normals) as the zip that vtk.js's OfflineLocalView loads: trame-vtk's serialization, as its
    export runs it, without the web server that export starts."""
    import io
    import json
    import zipfile

    from trame_vtk.modules.vtk.serializers import (
        SynchronizationContext,
        extract_array_hash,
        initialize_serializers,
        reference_id,
    )
    from trame_vtk.modules.vtk.serializers.render_windows import render_window_serializer

    initialize_serializers()
    context = SynchronizationContext()
    window = plotter.render_window
    scene = render_window_serializer(None, window, "1", context, 1)
    camera = plotter.renderers[0].camera
    scene["extra"] = {"vtkRefId": reference_id(window), "centerOfRotation": camera.GetFocalPoint(),
                      "camera": reference_id(camera)}
    hashes = {e["hash"]: {**e, "content": context.get_cached_data_array(e["hash"], False)}
              for e in extract_array_hash(scene)}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("index.json", json.dumps({"hashes": hashes, "scene": scene}))
    return buffer.getvalue()


def _html_overlay(panes: list[Pane]) -> str:
    """Per pane: its title (upper left), its legend (upper right: a checkbox, colour, name and
    value per organ, then the context surfaces), its note (middle)."""
    n = len(panes)
    parts = [HTML_STYLE, '<div class="content"></div>']
    for k, pane in enumerate(panes):
        left, right = 100 * k / n, 100 * (n - 1 - k) / n
        parts.append(f'<div class="abv" style="top: 8px; left: calc({left:g}% + 10px); font-weight: bold">'
                     f"{html.escape(pane.title)}</div>")
        rows = [(name, value, color) for name, value, color in pane.legend]
        rows += [("bones" if name == "bone" else name, "", BODY_COLOR if name == "body" else BONE_COLOR)
                 for name, _ in pane.context]
        if rows:
            lines = []
            for name, value, color in rows:
                absent = value == "absent"
                color = _rgb(color)  # as the actor has it: pyvista rounds colours to 8 bits
                hexcolor = "#" + "".join(f"{round(255 * c):02x}" for c in color)
                lines.append(
                    f'<label><input type="checkbox" class="abv-organ" data-pane="{k}" '
                    f'data-organ="{name.replace(" ", "_")}" data-color="{",".join(f"{c:.6g}" for c in color)}"'
                    f'{" disabled" if absent else " checked"}><span class="abv-swatch" '
                    f'style="background: {hexcolor}"></span>{html.escape(name)}'
                    f'<span class="abv-value">{html.escape(value)}</span></label>')
            parts.append(f'<div class="abv abv-card" style="top: 8px; right: calc({right:g}% + 8px)">'
                         + "".join(lines) + "</div>")
        if pane.note:
            parts.append(f'<div class="abv abv-note" style="left: {100 * (k + 0.5) / n:g}%">'
                         f"{html.escape(pane.note)}</div>")
    parts.append('<div class="abv" style="bottom: 6px; left: 10px; font-size: 12px">drag: rotate · wheel: zoom · '
                 "shift-drag: pan · opens from the front, the patient's right on your left</div>")
    parts.append(HTML_SCRIPT.replace("PANES", str(n)))
    return "\n".join(parts)


def html_page(plotter, panes: list[Pane], title: str) -> str:
    """A single self-contained HTML page (vtk.js and the scene inlined) of the plotter's scene,
    with the panes' overlay; it fetches nothing from the web."""
    import io

    from trame_vtk.tools.vtksz2html import write_html

    out = io.StringIO()
    write_html(scene_archive(plotter), out)
    page = out.getvalue()
    # vtk.js adds favicons from its website to the page's head: the page would go online for them.
    page = re.sub(r"""setAttribute\(\s*["']href["']\s*,\s*`https?://[^`]*favicon[^`]*`\s*\)""",
                  'setAttribute("href","data:,")', page)
    page = re.sub(r"<title>.*?</title>", lambda _: f"<title>{html.escape(title)}</title>", page, count=1)
    remote = loaded_urls(page)
    if remote or page.count("<body>") != 1:
        from importlib.metadata import version

        why = f"would load {remote[0]} from the web" if remote else "has no single <body> to add the legend to"
        raise UserError(f"--html: the viewer page of trame-vtk {version('trame-vtk')} {why}; install the tested "
                        f"one: pip install 'trame-vtk>=2.11,<3'")
    return page.replace("<body>", "<body>\n" + _html_overlay(panes), 1)


def write_html(path: Path, plotter, panes: list[Pane], title: str) -> None:
    page = html_page(plotter, panes, title)
    atomic_write(path, lambda tmp: tmp.write_text(page, encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Command line


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1280x720") from None
    if w < 64 or h < 64 or w > 7680 or h > 4320 or w % 2 or h % 2:
        raise UserError(f"--size {text}: width and height must be even, 64..7680 x 64..4320 (H.264 yuv420p)")
    return w, h


def check_output(path: Path, flag: str, suffix: str, overwrite: bool) -> None:
    """Fails now, before any rendering, if path cannot be written: wrong extension, missing or
    read-only folder, a folder in its place, an existing file without --overwrite."""
    if not path.name.lower().endswith(suffix):
        hint = "; for a still image use --png" if flag == "--output" else ""
        raise UserError(f"{flag} {path}: the file name must end in {suffix}{hint}")
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; give a file name ending in {suffix}")
    if path.exists() and not overwrite:
        raise UserError(f"{flag} {path}: exists; pass --overwrite to replace it")
    check_writable_folder(path.parent, path, flag)


# ---------------------------------------------------------------------------------------------
# Quick-look PNG (infer.py)
#
# A quick-look PNG of a segmentation: axial, coronal and sagittal slices through the organs with
# the mask over the CT, in radiological convention (the patient's right on the viewer's left,
# anterior up in axial views, superior up in coronal and sagittal ones), each pixel drawn with its
# true aspect from the voxel spacing, and an organ colour legend.

QUICKLOOK_COLOURS: dict[int, tuple[float, float, float]] = {
    1: (0.85, 0.33, 0.24),  # liver
    2: (0.98, 0.80, 0.10),  # right kidney
    3: (0.20, 0.78, 0.35),  # left kidney
    4: (0.35, 0.55, 1.00),  # spleen
}
QUICKLOOK_WINDOW = (-160.0, 240.0)  # HU, abdominal soft-tissue window (level 40, width 400)


def _quicklook_views(hu: np.ndarray, labels: np.ndarray, spacing: np.ndarray, centre: np.ndarray) -> list[tuple]:
    """(title, CT slice, label slice, pixel aspect) of the three planes through centre, on RAS
    arrays, oriented for display: rows top to bottom, columns left to right on screen."""
    x, y, z = (int(c) for c in centre)
    sx, sy, sz = spacing
    # On RAS arrays, a (a, b) plane shown with .T[::-1, ::-1] puts high b at the top and high a
    # (the patient's right for a = x, anterior for a = y) on the left.
    return [
        ("axial", hu[:, :, z].T[::-1, ::-1], labels[:, :, z].T[::-1, ::-1], sy / sx),
        ("coronal", hu[:, y, :].T[::-1, ::-1], labels[:, y, :].T[::-1, ::-1], sz / sx),
        ("sagittal", hu[x, :, :].T[::-1, ::-1], labels[x, :, :].T[::-1, ::-1], sz / sy),
    ]


def _organ_centre(labels: np.ndarray) -> np.ndarray:
    """Voxel indices (3,) of the organs' centre of mass, rounded (the volume's centre when there is
    no organ): ndimage.center_of_mass(labels > 0) to the last bit (integer sums), from per-axis
    counts instead of a float64 copy of the scan per axis."""
    organ = labels > 0
    total = np.count_nonzero(organ)
    if not total:
        return np.array(labels.shape) // 2
    plane = organ.sum(axis=2)
    counts = (plane.sum(axis=1), plane.sum(axis=0), organ.sum(axis=(0, 1)))
    return np.round([float(np.dot(np.arange(len(c)), c)) / total for c in counts])


def save_quicklook(path: str | Path, hu: np.ndarray, labels: np.ndarray, affine: np.ndarray, title: str = "") -> None:
    """Writes the PNG (atomically). hu (X, Y, Z) in HU and labels (X, Y, Z) uint8 on one grid of
    any orientation, affine (4, 4) RAS mm. Slices pass through the centre of the organs (of the
    volume when the mask is empty)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    transform = canonical_transform(affine, "RAS")
    hu, ras_affine = reorient(hu, affine, transform)
    labels, _ = reorient(labels, affine, transform)
    spacing = spacing_of(ras_affine)
    present = np.flatnonzero(label_counts(labels, len(LABELS)))
    centre = _organ_centre(labels)

    colours = np.zeros((len(LABELS), 4))
    for value, rgb in QUICKLOOK_COLOURS.items():
        colours[value] = (*rgb, 0.45)
    cmap = ListedColormap(colours)

    fig, axes = plt.subplots(1, 3, figsize=(15, 5.6), facecolor="black")
    for ax, (name, ct, lab, aspect) in zip(axes, _quicklook_views(hu, labels, spacing, centre)):
        lo, hi = QUICKLOOK_WINDOW
        ax.imshow(np.clip(ct.astype(np.float32), lo, hi), cmap="gray", vmin=lo, vmax=hi,
                  aspect=aspect, interpolation="bilinear")
        ax.imshow(lab, cmap=cmap, vmin=-0.5, vmax=len(LABELS) - 0.5, aspect=aspect, interpolation="nearest")
        if lab.any():
            ax.contour(lab, levels=np.arange(0.5, len(LABELS)), colors="white", linewidths=0.4, alpha=0.7)
        ax.set_title(name, color="white", fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        side = ("R", "L") if name != "sagittal" else ("A", "P")
        for text, xpos, ha in ((side[0], 0.01, "left"), (side[1], 0.99, "right")):
            ax.text(xpos, 0.5, text, transform=ax.transAxes, color="yellow", ha=ha, va="center", fontsize=12)
    handles = [Patch(facecolor=QUICKLOOK_COLOURS[v], label=LABELS[v] + ("" if v in present else " (none)"))
               for v in QUICKLOOK_COLOURS]
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, labelcolor="white",
               fontsize=11)
    fig.suptitle(title, color="white", fontsize=12)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=80, facecolor="black"))
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from dataset import LABEL_MAPS

    p = argparse.ArgumentParser(
        description="Render the organs of a label map in 3D: an orbiting MP4, a still PNG, an interactive "
                    "web page, meshes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--input", required=True, help="label map (.nii.gz): 0 background, 1 liver, 2 right kidney, "
                   "3 left kidney, 4 spleen (or see --label-map)")
    p.add_argument("--output", help="MP4 video to write (H.264, yuv420p)")
    p.add_argument("--png", help="still image (.png) to write, seen from --angle")
    p.add_argument("--html", help="interactive 3D page (.html) to write: one self-contained file that works "
                   "offline, opening seen from --angle")
    p.add_argument("--mesh", help="folder to write one mesh per organ into (ORGAN.<format>, world RAS mm)")
    p.add_argument("--mesh-format", choices=["stl", "obj", "ply"], default="stl", help="mesh file format")
    p.add_argument("--reference", help="reference label map (e.g. ground truth), shown beside --input")
    p.add_argument("--ct", help="the CT (HU) of --input: adds a translucent body surface and bones")
    p.add_argument("--label-map", default="identity", choices=sorted(LABEL_MAPS),
                   help="label values of --input: identity (ours), totalseg (TotalSegmentator), flare22")
    p.add_argument("--reference-label-map", choices=sorted(LABEL_MAPS),
                   help="label values of --reference; None: as --label-map")
    p.add_argument("--organs", default=",".join(ORGANS), help="comma-separated organs to show")
    p.add_argument("--frames", type=int, default=120, help="frames in one full orbit")
    p.add_argument("--fps", type=float, default=30.0, help="frames per second of the video")
    p.add_argument("--size", default="1280x720", help="video/still size WIDTHxHEIGHT (pixels)")
    p.add_argument("--angle", type=float, default=0.0,
                   help="azimuth of the still (degrees): 0 front, 90 patient's left, 180 back, 270 right")
    p.add_argument("--elevation", type=float, default=0.0, help="camera height above the axial plane (degrees)")
    p.add_argument("--voxel-mm", type=float, default=1.2,
                   help="grid (mm) the masks are block-averaged to before marching cubes; 0 keeps the input grid")
    p.add_argument("--smooth", type=int, default=50, help="Taubin smoothing iterations (0: none)")
    p.add_argument("--antialias", choices=ANTIALIAS, default="fxaa",
                   help="edge smoothing: fxaa (cheap), msaa (4x multisampling, slower), none (fastest)")
    p.add_argument("--title", help="title above the view; None: the input file name")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (else an existing one is an error)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> tuple[int, int]:
    """Validates the options and every output before any work; returns the frame size."""
    if not (args.output or args.png or args.html or args.mesh):
        raise UserError("nothing to write: pass --output VIDEO.mp4, --png STILL.png, --html PAGE.html and/or "
                        "--mesh FOLDER")
    size = parse_size(args.size)
    if args.frames < 1 or args.frames > 100_000:
        raise UserError(f"--frames {args.frames}: must be 1..100000")
    if not (0 < args.fps <= 240):
        raise UserError(f"--fps {args.fps}: must be in (0, 240]")
    if not (-89.0 <= args.elevation <= 89.0):
        raise UserError(f"--elevation {args.elevation}: must be in -89..89 degrees")
    if args.voxel_mm < 0 or args.voxel_mm > 20:
        raise UserError(f"--voxel-mm {args.voxel_mm}: must be 0..20 mm")
    if args.smooth < 0:
        raise UserError(f"--smooth {args.smooth}: must be 0 or more")
    if args.output:
        check_output(Path(args.output), "--output", ".mp4", args.overwrite)
    if args.png:
        check_output(Path(args.png), "--png", ".png", args.overwrite)
    if args.html:
        check_output(Path(args.html), "--html", ".html", args.overwrite)
        import importlib.util

        if importlib.util.find_spec("trame_vtk") is None:
            raise UserError("--html needs trame-vtk (VTK's web export): pip install 'trame-vtk>=2.11,<3'")
    if args.mesh:
        folder = Path(args.mesh)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--mesh {folder}: is a file; give a folder to write the meshes into")
        check_writable_folder(folder if folder.exists() else folder.parent, folder, "--mesh")
        existing = [p for p in (folder / f"{o}.{args.mesh_format}" for o in ORGANS) if p.exists()]
        if existing and not args.overwrite:
            raise UserError(f"--mesh {folder}: holds {existing[0].name} already; pass --overwrite to replace the "
                            f"meshes, or choose another folder")
    return size


def legend_lines(volumes: dict[str, float], organs: list[str],
                 dice: dict[str, float] | None = None) -> list[tuple[str, str, tuple[float, float, float]]]:
    """(name, 'volume mL[   Dice d]' or 'absent', colour) per organ."""
    lines = []
    for organ in organs:
        value = f"{volumes[organ]:,.0f} mL" if volumes[organ] > 0 else "absent"
        if dice is not None:
            value += f"   Dice {dice[organ]:.2f}"
        lines.append((pretty(organ), value, COLORS[organ]))
    return lines


def main(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    start = time.perf_counter()
    size = check_args(args)
    organs = parse_organs(args.organs)
    asked = args.organs != ",".join(ORGANS)

    labels, affine = read_labels(args.input, args.label_map)
    volumes = organ_volumes(labels, affine)
    present = [o for o in organs if volumes[o] > 0]
    # A mask without any organ (a scan without them) is a result, not an error: an empty scene
    # with a note, so that infer.py then visualize.py in a script goes on.
    empty = [args.input] if not any(volumes.values()) else []
    ref_present: list[str] = []
    if args.reference:
        ref_labels, ref_affine = read_labels(args.reference, args.reference_label_map or args.label_map,
                                             "reference label map")
        ref_volumes = organ_volumes(ref_labels, ref_affine)
        ref_present = [o for o in organs if ref_volumes[o] > 0]
        empty += [args.reference] if not any(ref_volumes.values()) else []
        missing = [o for o in organs if o not in present and o not in ref_present]
        if missing and asked and len(empty) < 2:
            raise UserError(f"{args.input} and {args.reference}: no voxels of {', '.join(missing)} in either; "
                            f"drop them from --organs or check --label-map")
    else:
        missing = [o for o in organs if o not in present]
        if missing and asked and not empty:
            raise UserError(f"{args.input}: no voxels of {', '.join(missing)} (asked by --organs); drop them "
                            f"from --organs, or check the file and --label-map")
    if not args.quiet:
        for path in empty:
            print(f"note: {path}: no organ in the mask (all voxels are background)"
                  + ("; no mesh written" if args.mesh and path == args.input else ""), file=sys.stderr)
        if missing and not empty:
            print(f"note: {args.input} has no {', '.join(missing)}", file=sys.stderr)

    surfaces = organ_surfaces(labels, affine, organs, args.voxel_mm, args.smooth)
    panes_organs = [o for o in organs if o in present or o in ref_present]
    if args.reference:
        dice = None
        if labels.shape == ref_labels.shape and np.allclose(affine, ref_affine, atol=1e-3):
            dice = dice_per_organ(labels, ref_labels)
        ref_surfaces = organ_surfaces(ref_labels, ref_affine, organs, args.voxel_mm, args.smooth)
        panes = [Pane("prediction", surfaces, legend_lines(volumes, panes_organs, dice)),
                 Pane("reference", ref_surfaces, legend_lines(ref_volumes, panes_organs))]
    else:
        panes = [Pane(args.title or Path(args.input).name, surfaces, legend_lines(volumes, panes_organs))]
    for pane, path in zip(panes, [args.input, args.reference]):
        pane.note = NO_ORGAN if path in empty else ""
    if args.ct:
        context = context_surfaces(args.ct, args.smooth)
        _check_overlap(args, context, surfaces)
        for pane in panes:
            pane.context = context

    if args.mesh:
        folder = Path(args.mesh)
        folder.mkdir(exist_ok=True)
        for organ, mesh in surfaces.items():
            write_mesh(folder / f"{organ}.{args.mesh_format}", mesh, args.mesh_format, organ)

    written = [f"{args.mesh}/ ({len(surfaces)} {args.mesh_format.upper()} meshes)"] if args.mesh else []
    shown = [m for p in panes for m in p.organs.values()] + [m for _, m in panes[0].context]
    if args.html:
        # vtk.js would draw the marker's viewport as a blank box: the page says how it opens instead.
        plotter = make_plotter(panes, size, "none", axes=False)
        try:
            # The page has no title band over the scene (its legend floats), and any window shape.
            fit_orbit(shown, size, len(panes), args.elevation, fill=0.75).place(plotter, args.angle)
            write_html(Path(args.html), plotter, panes, args.title or Path(args.input).name)
        finally:
            plotter.close()
        written.append(args.html)
    if args.output or args.png:
        plotter = make_plotter(panes, size, args.antialias)
        try:
            pane_px = (size[0] // len(panes), size[1])
            top = 1.0 - legend_rect(len(panes[0].legend), 0, pane_px)[1] / pane_px[1]
            orbit = fit_orbit(shown, size, len(panes), args.elevation, top)
            if args.png:
                write_png(Path(args.png), next(render_frames(plotter, orbit, [args.angle])))
                written.append(args.png)
            if args.output:
                azimuths = [360.0 * i / args.frames for i in range(args.frames)]
                bar = tqdm(azimuths, desc="rendering", unit="frame", disable=args.quiet, leave=False)
                write_video(Path(args.output), render_frames(plotter, orbit, bar), size, args.fps)
                written.append(f"{args.output} ({args.frames} frames {size[0]}x{size[1]} at {args.fps:g} fps)")
        finally:
            plotter.close()
    if not args.quiet:
        shown_text = ", ".join(f"{pretty(o)} {volumes[o]:,.0f} mL" for o in surfaces) or NO_ORGAN
        print(f"{Path(args.input).name}: {shown_text}")
        print(f"wrote {'; '.join(written)} in {time.perf_counter() - start:.1f} s")


def _check_overlap(args: argparse.Namespace, context: list, surfaces: dict) -> None:
    """A CT that does not contain the organs is the wrong CT (or the wrong geometry)."""
    body = next((m for name, m in context if name == "body"), None)
    if body is None or not surfaces:
        return
    lo, hi = np.asarray(body.bounds[0::2]), np.asarray(body.bounds[1::2])
    for organ, mesh in surfaces.items():
        c = np.asarray(mesh.center)
        if np.any(c < lo - 20) or np.any(c > hi + 20):
            raise UserError(f"{args.ct}: the {pretty(organ)} of {args.input} lies outside this CT's body in world "
                            f"coordinates; pass the CT the label map was made from")


if __name__ == "__main__":
    run_cli(main, parse_args())
