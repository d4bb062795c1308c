"""DICOM round trip: a volume written as a DICOM series (shuffled files, rescale slope and
intercept, oblique orientation) is read back with the right RAS affine and HU, and segmented onto
its own grid."""

import random

import nibabel as nib
import numpy as np
import pytest

from dicom_series import read_dicom_series
from utils import UserError

pydicom = pytest.importorskip("pydicom")


def rotation_z(deg):
    a = np.radians(deg)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def write_series(folder, hu, row_dir, col_dir, pixel_spacing, slice_step, origin, slope=2.0, intercept=-1024.0,
                 drop=None, duplicate=False):
    """hu (X = columns, Y = rows, Z = slices), LPS geometry. Files get shuffled names. Returns the
    expected RAS affine."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    normal = np.cross(row_dir, col_dir)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    order = list(range(hu.shape[2]))
    random.Random(0).shuffle(order)
    for n, k in enumerate(order):
        if k == drop:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.StudyDate, ds.StudyTime = "Phantom^One", "PH001", "20260101", "120000"
        ds.SeriesNumber = 3
        ds.InstanceNumber = n + 1  # deliberately not the slice order
        ds.Rows, ds.Columns = hu.shape[1], hu.shape[0]
        ds.PixelSpacing = [f"{pixel_spacing[0]:g}", f"{pixel_spacing[1]:g}"]
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in (*row_dir, *col_dir)]
        position = origin + (1 if duplicate and k == 2 else k) * slice_step * normal
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
        ds.SliceThickness = f"{slice_step:g}"
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
        stored = np.round((hu[:, :, k].T.astype(np.float64) - intercept) / slope).astype(np.uint16)
        ds.PixelData = stored.tobytes()
        ds.save_as(folder / f"IM{n * 7919 % 1000:04d}", enforce_file_format=True)
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(row_dir) * pixel_spacing[1]
    lps[:3, 1] = np.asarray(col_dir) * pixel_spacing[0]
    lps[:3, 2] = normal * slice_step
    lps[:3, 3] = origin
    return np.diag([-1, -1, 1, 1]) @ lps


def volume(shape=(24, 20, 9)):
    rng = np.random.default_rng(0)
    return (rng.integers(-512, 1200, shape) * 2).astype(np.int16)  # even: exact with slope 2


@pytest.mark.parametrize("oblique", [0.0, 20.0])
def test_round_trip_geometry_and_hu(tmp_path, oblique):
    hu = volume()
    rot = rotation_z(oblique)
    expected = write_series(tmp_path / "s", hu, rot @ [1, 0, 0], rot @ [0, 1, 0], (0.7, 0.8), 2.5,
                            np.array([-120.0, -90.0, 35.0]))
    read, affine = read_dicom_series(tmp_path / "s")
    np.testing.assert_allclose(affine, expected, atol=1e-4)
    assert read.dtype == np.int16
    np.testing.assert_array_equal(read, hu)
    if oblique == 0:
        assert nib.aff2axcodes(affine) == ("L", "P", "S")


def test_feet_first_slices_and_float_rescale(tmp_path):
    hu = volume()
    expected = write_series(tmp_path / "s", hu, [1, 0, 0], [0, 1, 0], (0.9, 0.9), -3.0,
                            np.array([0.0, 0.0, 0.0]), slope=0.5, intercept=-1024.25)
    read, affine = read_dicom_series(tmp_path / "s")
    # Slices are sorted by position along the normal; the step is then positive along it.
    flip = np.diag([1, 1, -1, 1])
    flip[2, 3] = hu.shape[2] - 1
    np.testing.assert_allclose(affine, expected @ flip, atol=1e-4)
    np.testing.assert_allclose(read, (np.round((hu + 1024.25) / 0.5) * 0.5 - 1024.25)[:, :, ::-1], atol=1e-3)


@pytest.mark.parametrize("problem,match", [("gap", "not evenly spaced"), ("duplicate", "same slice position"),
                                           ("single", "single slice")])
def test_broken_series_is_a_clear_error(tmp_path, problem, match):
    hu = volume((8, 8, 6)) if problem != "single" else volume((8, 8, 1))
    write_series(tmp_path / "s", hu, [1, 0, 0], [0, 1, 0], (1, 1), 2.0, np.zeros(3),
                 drop=3 if problem == "gap" else None, duplicate=problem == "duplicate")
    with pytest.raises(UserError, match=match):
        read_dicom_series(tmp_path / "s")


def test_infer_on_a_dicom_series(tmp_path):
    import torch
    from test_infer import make_checkpoint

    import infer
    from phantom import make_phantom

    hu, _, _ = make_phantom(5, spacing=(5.0, 5.0, 5.0))
    hu = hu[::-1, ::-1].copy()  # RAS -> LPS columns and rows, as DICOM stores an axial series
    expected = write_series(tmp_path / "series", hu, [1, 0, 0], [0, 1, 0], (5, 5), 5.0,
                            np.array([-150.0, -120.0, -60.0]), slope=1.0, intercept=-1024.0)
    ckpt = make_checkpoint(tmp_path / "tiny.pt")
    out = tmp_path / "seg.nii.gz"
    with torch.inference_mode():
        infer.main(infer.parse_args(["--input", str(tmp_path / "series"), "--output", str(out), "--checkpoint",
                                     str(ckpt), "--device", "cpu", "--quiet", "--no-png"]))
    img = nib.load(str(out))
    assert img.shape == hu.shape
    np.testing.assert_allclose(img.affine, expected, atol=1e-4)


def phantom_series(folder, oblique=0.0):
    """A 5 mm phantom written as an axial DICOM series (rotated about z by `oblique` degrees);
    returns the expected RAS affine."""
    from phantom import make_phantom

    hu, _, _ = make_phantom(5, spacing=(5.0, 5.0, 5.0))
    hu = hu[::-1, ::-1].copy()  # RAS -> LPS columns and rows, as DICOM stores an axial series
    rot = rotation_z(oblique)
    return write_series(folder, hu, rot @ [1, 0, 0], rot @ [0, 1, 0], (5, 5), 5.0, np.array([-150.0, -120.0, -60.0]),
                        slope=1.0, intercept=-1024.0)


def segment(args, tmp_path, png=False):
    import torch
    from test_infer import make_checkpoint

    import infer

    ckpt = tmp_path / "tiny.pt"
    if not ckpt.exists():
        make_checkpoint(ckpt)
    with torch.inference_mode():
        return infer.main(infer.parse_args([*args, "--checkpoint", str(ckpt), "--device", "cpu", "--quiet",
                                            *([] if png else ["--no-png"])]))


def test_dicom_seg_lies_on_the_source_slices(tmp_path):
    """A DICOM series in: the NIfTI mask and a DICOM SEG beside it. Read back with highdicom: it
    references the series and its instances, every frame sits on a source slice, the decoded
    organs equal the NIfTI mask, the segments carry their SNOMED CT codes and the algorithm; it
    passes dciodvfy when dicom3tools is installed."""
    import shutil
    import subprocess

    hd = pytest.importorskip("highdicom")
    from dicom_series import sorted_slices

    phantom_series(tmp_path / "series", oblique=20.0)
    segment(["--input", str(tmp_path / "series"), "--output", str(tmp_path / "seg.nii.gz")], tmp_path)
    labels = np.asarray(nib.load(tmp_path / "seg.nii.gz").dataobj)
    assert set(np.unique(labels)) == {0, 1, 2, 3, 4}
    seg = hd.seg.segread(tmp_path / "seg.dcm")  # highdicom's reader checks the IOD's structure as it parses

    sources = [ds for _, ds in sorted_slices(tmp_path / "series")]
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {str(i.ReferencedSOPInstanceUID) for i in referenced.ReferencedInstanceSequence} == set(uids)
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in sources])
    assert seg.NumberOfFrames >= 1
    for frame in seg.PerFrameFunctionalGroupsSequence:
        where = np.array([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient])
        k = int(np.argmin(np.abs(positions - where).sum(1)))
        np.testing.assert_allclose(where, positions[k], atol=1e-4)
        assert frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID == uids[k]
    decoded = seg.get_pixels_by_source_instance(uids, combine_segments=True)  # (slice, row, column)
    np.testing.assert_array_equal(decoded.transpose(2, 1, 0), labels)

    expected = {1: ("10200004", "Liver", None), 2: ("64033007", "Kidney", "24028007"),
                3: ("64033007", "Kidney", "7771000"), 4: ("78961009", "Spleen", None)}
    assert [int(d.SegmentNumber) for d in seg.SegmentSequence] == [1, 2, 3, 4]
    for d in seg.SegmentSequence:
        code, meaning, side = expected[int(d.SegmentNumber)]
        kind = d.SegmentedPropertyTypeCodeSequence[0]
        assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == (code, "SCT", meaning)
        modifiers = [m.CodeValue for m in kind.get("SegmentedPropertyTypeModifierCodeSequence", [])]
        assert modifiers == ([side] if side else [])
        assert d.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
        assert d.SegmentAlgorithmType == "AUTOMATIC" and d.SegmentAlgorithmName == "abdomen-vnet"
        algorithm = d.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "abdomen-vnet" and "tiny.pt" in algorithm.AlgorithmParameters
    assert seg.ManufacturerModelName == "tiny.pt"

    if shutil.which("dciodvfy") is None:
        pytest.skip("dciodvfy (Debian package dicom3tools) is not installed; highdicom's reader checked the SEG")
    r = subprocess.run(["dciodvfy", str(tmp_path / "seg.dcm")], capture_output=True, text=True)
    report = r.stdout + r.stderr
    assert "Segmentation" in report and not [line for line in report.splitlines() if line.startswith("Error")], report


def test_dicom_seg_only_and_refused_for_nifti(tmp_path):
    phantom_series(tmp_path / "series")
    segment(["--input", str(tmp_path / "series"), "--output", str(tmp_path / "organs.dcm")], tmp_path, png=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["organs.dcm", "organs.png", "organs_statistics.json", "series",
                                                          "tiny.pt"]
    import infer

    assert infer.stored_type(tmp_path / "series") == "uint16 x1 -1024"  # the log line's type
    hu, affine = read_dicom_series(tmp_path / "series")
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "ct.nii.gz")
    with pytest.raises(UserError, match="ct.nii.gz: .*DICOM SEG needs the DICOM series"):
        segment(["--input", str(tmp_path / "ct.nii.gz"), "--output", str(tmp_path / "x.nii.gz"), "--output-type",
                 "dicom-seg"], tmp_path)
