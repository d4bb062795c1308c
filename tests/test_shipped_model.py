"""The shipped phantom-trained model: small, safe to load, used by default, and it segments real CT."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REAL, ROOT, needs_real

import infer
from phantom import make_phantom
from utils import LABELS

SHIPPED = ROOT / "checkpoints" / "phantom_small.pt"
# The shipped ensemble's Dice (bench/RESULTS.md, "The shipped model on real CT") less 0.03, rounded
# down: a floor against regressions, not the target (issue 21's goals are higher and not met).
FLOOR_IRCAD = {"liver": 0.912, "right_kidney": 0.849, "left_kidney": 0.879, "spleen": 0.892}
FLOOR_TS = {"liver": 0.881, "right_kidney": 0.855, "left_kidney": 0.883, "spleen": 0.903}


def segment_with_shipped(image, label, tmp_path, label_map="identity") -> dict:
    """`python infer.py` with the shipped model on one scan and its reference; the case's metrics.
    The mask is written to tmp_path/seg.nii.gz."""
    summary = infer.main(infer.parse_args(["--input", str(image), "--output", str(tmp_path / "seg.nii.gz"),
                                           "--checkpoint", str(SHIPPED), "--label", str(label), "--label-map",
                                           label_map, "--no-png", "--quiet", "--metrics", str(tmp_path / "m")]))
    (result,) = summary["cases"].values()
    return result["metrics"]


def assert_dice_floors(metrics: dict, floor: dict) -> None:
    dice = {organ: metrics[organ]["dice"] for organ in floor}
    assert all(dice[o] >= floor[o] for o in floor), json.dumps(dice)


def test_shipped_model_is_small_and_loads_safely():
    assert SHIPPED.is_file() and SHIPPED.stat().st_size <= 20 * 2**20
    ckpt = torch.load(SHIPPED, map_location="cpu", weights_only=True)
    assert ckpt["labels"] == {str(k): v for k, v in LABELS.items()}
    assert "optimizer" not in ckpt  # a model, not a run to resume
    cfg = ckpt["train_config"]
    assert cfg["stream"] > 0 and cfg["phantom"] in ("procedural", "atlas", "mixed")  # trained on phantoms only


def test_shipped_model_segments_a_phantom(tmp_path):
    hu, label, affine = make_phantom(21, spacing=(2.5, 2.5, 4.0))
    nib.save(nib.Nifti1Image(hu, affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "ref.nii.gz")
    metrics = segment_with_shipped(tmp_path / "ct.nii.gz", tmp_path / "ref.nii.gz", tmp_path)
    seg = nib.load(tmp_path / "seg.nii.gz")
    assert seg.shape == hu.shape and np.allclose(seg.affine, affine)
    assert metrics["liver"]["dice"] > 0.8


@needs_real
@pytest.mark.parametrize("image,label,label_map,floor", [
    ("ircad_p1/image.nii.gz", "ircad_p1/label.nii.gz", "identity", FLOOR_IRCAD),
    ("totalseg_example/ct.nii.gz", "totalseg_example/segmentation.nii.gz", "totalseg", FLOOR_TS),
])
def test_shipped_model_on_real_ct(image, label, label_map, floor, tmp_path):
    """Guards the figures in bench/RESULTS.md (a few points below them) against regressions in the
    inference path: these two scans were never used for training."""
    assert_dice_floors(segment_with_shipped(REAL / image, REAL / label, tmp_path, label_map), floor)
