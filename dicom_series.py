"""Reading a CT DICOM series (one folder of slice files) into a volume in HU with its RAS affine.

Slices are ordered by their position along the slice normal (ImagePositionPatient projected on
the cross product of the ImageOrientationPatient row and column directions), not by file name or
InstanceNumber; each slice's RescaleSlope and RescaleIntercept are applied (pydicom's modality
LUT); the affine comes from ImageOrientationPatient, PixelSpacing and the positions of the first
and last slices, converted from DICOM's LPS patient coordinates to the RAS world of NIfTI.

Array axes: (column, row, slice), as dcm2niix and nibabel lay out a series, so axis 0 runs along
the DICOM row direction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from utils import UserError

# DICOM patient coordinates are LPS (+x patient's left, +y posterior); NIfTI world is RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom_file(path: Path) -> bool:
    """A .dcm file, or one with DICOM's "DICM" marker at byte 128."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files of a folder (not its subfolders), DICOMDIR and hidden files left out."""
    return [p for p in sorted(folder.iterdir())
            if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR" and is_dicom_file(p)]


def is_dicom_folder(folder: Path) -> bool:
    return folder.is_dir() and bool(dicom_files(folder))


def _floats(ds, keyword: str, n: int, path: Path) -> np.ndarray:
    value = getattr(ds, keyword, None)
    if value is None or len(value) != n:
        raise UserError(f"{path}: missing or malformed {keyword}; the slice lacks the geometry needed to "
                        f"place it (re-export the series with full headers)")
    return np.array([float(v) for v in value], dtype=np.float64)


def read_dicom_series(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CT series from a folder -> (HU volume (X, Y, Z) int16 when the values fit, else float32;
    affine (4, 4) RAS, mm). Raises UserError on a folder that holds no series, several series,
    inconsistent or missing geometry, duplicate or unevenly spaced slices, or a single slice."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    folder = Path(folder)
    files = dicom_files(folder)
    if not files:
        raise UserError(f"{folder}: no DICOM files found; pass a folder holding one series' slices")
    headers = []
    for p in files:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, AttributeError) as e:
            raise UserError(f"{p}: cannot read this DICOM file ({type(e).__name__}: {e}); remove it or re-export "
                            f"the series") from None
        if "PixelData" not in ds and not hasattr(ds, "Rows"):
            continue  # a report or presentation state stored beside the slices
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise UserError(f"{p}: a multi-frame (enhanced) DICOM image, which is not read here; convert the series "
                            f"to NIfTI first (e.g. dcm2niix) and pass the .nii.gz")
        headers.append((p, ds))
    series = {}
    for p, ds in headers:
        series.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append((p, ds))
    if len(series) > 1:
        sizes = ", ".join(f"{uid or '?'} ({len(v)} files)" for uid, v in series.items())
        raise UserError(f"{folder}: holds {len(series)} DICOM series ({sizes}); put each series in its own folder")
    if not series:
        raise UserError(f"{folder}: its DICOM files hold no images")
    slices = next(iter(series.values()))
    if len(slices) < 2:
        raise UserError(f"{folder}: the series has a single slice (a 2D image); a 3D CT series is needed")

    p0, ds0 = slices[0]
    orient = _floats(ds0, "ImageOrientationPatient", 6, p0)
    row_dir, col_dir = orient[:3], orient[3:]
    normal = np.cross(row_dir, col_dir)
    if abs(np.linalg.norm(normal) - 1.0) > 1e-3:
        raise UserError(f"{p0}: ImageOrientationPatient {orient.tolist()} is not two orthogonal unit vectors; "
                        f"the header is damaged")
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    placed = []
    for p, ds in slices:
        if not np.allclose(_floats(ds, "ImageOrientationPatient", 6, p), orient, atol=1e-4):
            raise UserError(f"{p}: its orientation differs from {p0.name}'s; the folder mixes acquisitions "
                            f"(e.g. a localizer): keep one series")
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise UserError(f"{p}: {ds.Rows}x{ds.Columns} pixels, {p0.name} has {rows}x{cols}; "
                            f"the folder mixes images of different sizes: keep one series")
        position = _floats(ds, "ImagePositionPatient", 3, p)
        placed.append((float(position @ normal), position, p, ds))
    placed.sort(key=lambda t: t[0])
    depths = np.array([t[0] for t in placed])
    steps = np.diff(depths)
    if np.any(steps < 1e-3):
        k = int(np.argmin(steps))
        raise UserError(f"{placed[k + 1][2]}: same slice position as {placed[k][2].name}; the folder holds "
                        f"duplicate slices or several acquisitions: keep one series")
    step = float(np.median(steps))
    if np.any(np.abs(steps - step) > max(0.01 * step, 1e-3)):
        k = int(np.argmax(np.abs(steps - step)))
        raise UserError(f"{folder}: slices are not evenly spaced ({steps[k]:.3f} mm between {placed[k][2].name} and "
                        f"{placed[k + 1][2].name}, {step:.3f} mm elsewhere); a slice is missing or the series "
                        f"has variable spacing")
    spacing = _floats(ds0, "PixelSpacing", 2, p0)  # (between rows, between columns)

    volume = None
    for k, (_, _, p, _) in enumerate(placed):
        try:
            ds = pydicom.dcmread(p)
            pixels = ds.pixel_array
            hu = apply_modality_lut(pixels, ds)
        except Exception as e:  # pydicom raises many types for missing decoders and damaged pixel data
            raise UserError(f"{p}: cannot decode its pixels ({type(e).__name__}: {str(e).splitlines()[0][:120]}); "
                            f"a compressed series needs a decoder (pip install pylibjpeg pylibjpeg-libjpeg "
                            f"pylibjpeg-openjpeg), or the file is damaged") from None
        if hu.shape != (rows, cols):
            raise UserError(f"{p}: pixel data of shape {hu.shape}, expected ({rows}, {cols}); a multi-frame or "
                            f"colour image is not a CT slice")
        if volume is None:
            volume = np.empty((cols, rows, len(placed)), dtype=np.float32)
        volume[:, :, k] = hu.T

    first, last = placed[0][1], placed[-1][1]
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * spacing[1]
    affine_lps[:3, 1] = col_dir * spacing[0]
    affine_lps[:3, 2] = (last - first) / (len(placed) - 1)
    affine_lps[:3, 3] = first
    if np.all(volume == np.round(volume)) and volume.min() >= -32768 and volume.max() <= 32767:
        volume = volume.astype(np.int16)
    return volume, LPS_TO_RAS @ affine_lps
