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


def sorted_slices(folder: str | Path) -> list[tuple[Path, object]]:
    """The image slices of the one series in a folder, as (path, header without pixels), sorted by
    position along the slice normal: the order of the volume's slice axis. Raises UserError on a
    folder that holds no series, several series, inconsistent or missing geometry, duplicate or
    unevenly spaced slices, or a single slice."""
    import pydicom
    from pydicom.errors import InvalidDicomError

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
    return [(p, ds) for _, _, p, ds in placed]


def read_dicom_series(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CT series from a folder -> (HU volume (X, Y, Z) int16 when the values fit, else float32;
    affine (4, 4) RAS, mm). Raises UserError as sorted_slices does, and on undecodable pixels."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    folder = Path(folder)
    slices = sorted_slices(folder)
    p0, ds0 = slices[0]
    orient = _floats(ds0, "ImageOrientationPatient", 6, p0)
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    spacing = _floats(ds0, "PixelSpacing", 2, p0)  # (between rows, between columns)

    volume = None
    for k, (p, _) in enumerate(slices):
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
            volume = np.empty((cols, rows, len(slices)), dtype=np.float32)
        volume[:, :, k] = hu.T

    first = _floats(ds0, "ImagePositionPatient", 3, p0)
    last = _floats(slices[-1][1], "ImagePositionPatient", 3, slices[-1][0])
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = orient[:3] * spacing[1]
    affine_lps[:3, 1] = orient[3:] * spacing[0]
    affine_lps[:3, 2] = (last - first) / (len(slices) - 1)
    affine_lps[:3, 3] = first
    if np.all(volume == np.round(volume)) and volume.min() >= -32768 and volume.max() <= 32767:
        volume = volume.astype(np.int16)
    return volume, LPS_TO_RAS @ affine_lps


def stored_type(ds) -> str:
    """The pixel type a CT slice stores, with its rescale when there is one: "uint16 x2 -1024" (HU =
    2 * stored - 1024), "int16"."""
    bits = int(getattr(ds, "BitsAllocated", 16) or 16)
    kind = "int" if int(getattr(ds, "PixelRepresentation", 0) or 0) else "uint"
    slope, intercept = float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)
    scaling = f" x{slope:g} {intercept:+g}" if (slope, intercept) != (1.0, 0.0) else ""
    return f"{kind}{bits}{scaling}"


# SNOMED CT codes of the organs as DCMQI and 3D Slicer's terminology (SegmentationCategoryTypeModifier-
# SlicerGeneralAnatomy) code them, and as highdicom's pydicom code dictionary holds them: category
# "Anatomical structure", type the organ, kidneys with a laterality modifier.
SCT_ANATOMICAL_STRUCTURE = ("91723000", "Anatomical Structure")
SCT_ORGANS: dict[str, tuple[tuple[str, str], tuple[str, str] | None]] = {
    "liver": (("10200004", "Liver"), None),
    "right_kidney": (("64033007", "Kidney"), ("24028007", "Right")),
    "left_kidney": (("64033007", "Kidney"), ("7771000", "Left")),
    "spleen": (("78961009", "Spleen"), None),
}


def _sct(code: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=code, scheme_designator="SCT", meaning=meaning)


_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                  "ReferringPhysicianName", "StudyID", "AccessionNumber")


def dicom_seg(labels: np.ndarray, folder: str | Path, model_name: str, version: str):
    """A DICOM Segmentation (highdicom, binary, one segment per organ, segment number = our label
    value) of labels over the series in folder, ready to save. labels: uint8 (X, Y, Z) on the grid
    read_dicom_series gives for that folder; frame k lies on the k-th slice along the normal and
    references it. Slices without any organ are left out (the standard allows it; viewers place
    each frame by its position); an all-background mask keeps every frame, so it opens too.
    Raises UserError when highdicom is missing or the series' headers cannot make a SEG."""
    try:
        import highdicom as hd
    except ImportError:
        raise UserError("a DICOM SEG output needs highdicom: pip install highdicom (or pass --output-type nifti)"
                        ) from None
    from pydicom.sr.codedict import codes

    from utils import LABELS, first_line

    folder = Path(folder)
    # The headers alone: the SEG copies their identifiers and geometry, never their pixels.
    sources = [ds for _, ds in sorted_slices(folder)]
    for ds in sources:  # type 2 attributes the SEG copies; anonymisation often strips them
        for keyword in _PATIENT_STUDY:
            if keyword not in ds:
                setattr(ds, keyword, "")
    frames = np.ascontiguousarray(np.asarray(labels, dtype=np.uint8).transpose(2, 1, 0))  # (slice, row, column)
    if frames.shape != (len(sources), int(sources[0].Rows), int(sources[0].Columns)):
        raise UserError(f"{folder}: the mask's shape {labels.shape} is not this series' grid; segment the series itself")
    algorithm = hd.AlgorithmIdentificationSequence(name="abdomen-vnet", family=codes.cid7162.ArtificialIntelligence,
                                                   version=version, parameters={"checkpoint": model_name})
    category = _sct(*SCT_ANATOMICAL_STRUCTURE)
    segments = []
    for value, organ in sorted(LABELS.items()):
        if value == 0:
            continue
        (code, meaning), modifier = SCT_ORGANS[organ]
        description = hd.seg.SegmentDescription(
            segment_number=value, segment_label=organ.replace("_", " "), segmented_property_category=category,
            segmented_property_type=_sct(code, meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        if modifier is not None:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                _sct(*modifier)]
        segments.append(description)
    source = sources[0]
    try:
        return hd.seg.Segmentation(
            source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=segments, series_instance_uid=hd.UID(),
            series_number=int(getattr(source, "SeriesNumber", 0) or 0) + 1000, sop_instance_uid=hd.UID(),
            instance_number=1, manufacturer="abdomen-vnet", manufacturer_model_name=model_name,
            software_versions=version, device_serial_number="none", content_label="ORGANS",
            content_description="Liver, kidneys and spleen (abdomen-vnet)", series_description="abdomen-vnet organs",
            omit_empty_frames=bool(frames.any()))
    except (ValueError, TypeError, AttributeError) as e:  # highdicom's checks of the source headers
        raise UserError(f"{folder}: cannot make a DICOM SEG of this series ({first_line(e)}); fix its headers, or "
                        f"pass --output-type nifti for the NIfTI mask alone") from None
