"""The real CTs in ../shared/data/real (skipped when absent): TotalSegmentator's example (RAS, 3 mm,
its own label map) and IRCAD patient 1 (LPS, 0.57 x 0.57 x 1.6 mm, ours) must come out in one
canonical orientation with every organ on the patient's correct side, survive resampling and its
inverse, and train end to end; FLARE22's label files must put 13 (left kidney) on the left."""

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import REAL, needs_real

import dataset
import train
from dataset import CasePaths, discover, label_map_from_filename, load_case, read_case, remap_labels
from utils import Preprocessing, labels_to_input_grid, load_nifti, preprocess_label, save_nifti, to_grid

pytestmark = needs_real

TOTALSEG = REAL / "totalseg_example"
IRCAD = REAL / "ircad_p1"
FLARE = REAL / "flare22_labels"
CASES = {
    "totalseg": (CasePaths("totalseg_example", TOTALSEG / "ct.nii.gz", TOTALSEG / "segmentation.nii.gz"), "totalseg"),
    "ircad": (CasePaths("ircad_p1", IRCAD / "image.nii.gz", IRCAD / "label.nii.gz"), "identity"),
}


@pytest.fixture(scope="module")
def pairs():
    """name -> (HU, affine, label in our values) on each case's own grid, read once."""
    return {name: read_case(case, label_map) for name, (case, label_map) in CASES.items()}


def world_x(mask: np.ndarray, affine: np.ndarray) -> float:
    """World x of a mask's centroid (RAS mm: larger is further to the patient's right)."""
    n = np.count_nonzero(mask)
    centroid = [(mask.sum(axis=tuple(a for a in range(3) if a != axis)) * np.arange(mask.shape[axis])).sum() / n
                for axis in range(3)]
    return float((affine @ np.r_[centroid, 1.0])[0])


def dice(pred: np.ndarray, ref: np.ndarray) -> dict[int, float]:
    """Dice of organs 1-4 from one joint histogram (a single pass over large volumes)."""
    joint = np.bincount(ref.astype(np.int64).ravel() * 5 + pred.ravel(), minlength=25).reshape(5, 5)
    return {c: 2 * joint[c, c] / (joint[c].sum() + joint[:, c].sum()) for c in range(1, 5)}


def test_totalseg_example_is_found_and_detected():
    found = discover(TOTALSEG)
    assert found.layout == "totalseg" and [c.name for c in found.cases] == ["totalseg_example"]
    assert found.label_map == "totalseg"


@pytest.mark.parametrize("name,code", [("totalseg", ("R", "A", "S")), ("ircad", ("L", "P", "S"))])
def test_canonical_orientation_and_organ_sides(name, code, pairs):
    case, label_map = CASES[name]
    assert nib.aff2axcodes(pairs[name][1]) == code  # the two sources really differ
    v = load_case(case, Preprocessing(spacing=(3.0, 3.0, 3.0)), label_map)
    assert nib.aff2axcodes(v.affine) == ("R", "A", "S")
    # Axes along +x, +y, +z; voxels 3 mm to within the rounding that keeps the scan's extent.
    spacing = np.diag(v.affine)[:3]
    assert np.allclose(v.affine[:3, :3], np.diag(spacing)) and np.allclose(spacing, 3.0, rtol=0.01)
    assert set(np.unique(v.label)) == {0, 1, 2, 3, 4}
    # Midline: the centre of the body's left-right extent at the kidneys' levels.
    kidney_z = np.flatnonzero(np.isin(v.label, (2, 3)).any(axis=(0, 1)))
    body_x = np.flatnonzero((v.image[:, :, kidney_z] > -300).any(axis=(1, 2)))
    midline = float((v.affine @ np.r_[(body_x[0] + body_x[-1]) / 2, 0, 0, 1])[0])
    right, left = world_x(v.label == 2, v.affine), world_x(v.label == 3, v.affine)
    liver, spleen = world_x(v.label == 1, v.affine), world_x(v.label == 4, v.affine)
    assert right > midline + 30 and left < midline - 30, (right, midline, left)
    assert liver > midline > spleen
    # Same check through the source affine: the source files agree with the canonical volume.
    hu, affine, label = pairs[name]
    assert world_x(label == 2, affine) == pytest.approx(right, abs=3.0)
    assert world_x(label == 3, affine) == pytest.approx(left, abs=3.0)


@pytest.mark.parametrize("name", ["totalseg", "ircad"])
def test_label_round_trip_at_1_5_mm(name, pairs, tmp_path):
    _, affine, label = pairs[name]
    info = to_grid(label, affine, Preprocessing(spacing=(1.5, 1.5, 1.5)))
    small = preprocess_label(label, info)
    assert small.shape == info.shape_out
    back = labels_to_input_grid(small, info)
    assert back.shape == label.shape and back.dtype == np.uint8
    save_nifti(tmp_path / "back.nii.gz", back, info.affine)
    written = nib.load(tmp_path / "back.nii.gz")
    assert written.shape == label.shape
    assert np.allclose(written.affine, affine, atol=1e-5) and nib.aff2axcodes(written.affine) == nib.aff2axcodes(affine)
    scores = dice(back, label)
    assert min(scores.values()) >= 0.95, scores


@pytest.mark.parametrize("path", sorted(FLARE.glob("FLARE22_Tr_*.nii.gz")) if FLARE.exists() else [],
                         ids=lambda p: p.name)
def test_flare22_labels_map_13_to_the_left_kidney(path):
    assert label_map_from_filename(path.name) == "flare22"
    source, affine = load_nifti(path, "label")
    assert 13 in np.unique(source[::4, ::4, ::2])
    ours = remap_labels(source, "flare22", path)
    assert np.array_equal(ours == 3, source == 13) and np.array_equal(ours == 4, source == 3)
    left, right = world_x(ours == 3, affine), world_x(ours == 2, affine)
    assert left < right - 50  # the left kidney lies on the patient's left
    assert world_x(ours == 1, affine) > world_x(ours == 4, affine)  # liver right, spleen left


def _datalist(tmp_path):
    datalist = {
        "training": [{"image": str(TOTALSEG / "ct.nii.gz"), "label": str(TOTALSEG / "segmentation.nii.gz"),
                      "label_map": "totalseg"}],
        "validation": [{"image": str(IRCAD / "image.nii.gz"), "label": str(IRCAD / "label.nii.gz"),
                        "label_map": "identity", "name": "ircad_p1"}],
    }
    path = tmp_path / "real.json"
    path.write_text(json.dumps(datalist))
    return path


def test_check_real_cases(tmp_path, capsys):
    assert dataset.check_dataset(_datalist(tmp_path)) == 0
    out = capsys.readouterr().out
    assert "totalseg_example: 122x101x112 int32, 3.00x3.00x3.00 mm, RAS; HU -1207..3382; labels {1-14,16-24,51-57," in out
    assert "ircad_p1: 512x512x129 int16, 0.57x0.57x1.60 mm, LPS; HU -1024..1023; labels {1-4}; liver " in out
    assert "label map totalseg, identity (from the cases' own entries)" in out
    assert "checked 2 cases: 2 fine, 0 with problems; 0 problems in all" in out


def test_train_end_to_end_on_real_cases(tmp_path):
    summary = train.main(train.parse_args([
        "--data", str(_datalist(tmp_path)), "--epochs", "2", "--spacing", "6", "--patch", "32", "--steps-per-epoch", "2",
        "--device", "cpu", "--out", str(tmp_path / "runs"), "--run", "real", "--cache", str(tmp_path / "cache")]))
    run = tmp_path / "runs" / "real"
    assert summary["epochs_run"] == 2 and (run / "best.pt").exists() and (run / "metrics.json").exists()
    import torch

    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["label_map"] == "totalseg+identity"
    assert ckpt["preprocessing"]["spacing"] == [6.0, 6.0, 6.0] and ckpt["preprocessing"]["orientation"] == "RAS"
    assert len(list((tmp_path / "cache").glob("*/image.npy"))) == 2
