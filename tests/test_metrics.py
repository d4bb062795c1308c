"""metrics.py against MONAI's metrics (the oracle), on random and real masks, plus empty masks
and the CSV/JSON reports."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import REAL, needs_real
from scipy import ndimage

from metrics import hd95_nsd, organ_metrics, organ_statistics, overlap_scores, surface, surface_distances, write_reports
from utils import ORGANS, load_nifti, spacing_of

monai_metrics = pytest.importorskip("monai.metrics")


def random_labels(shape, seed, smooth=2.0):
    """Blobby label map with all four organs: thresholds of smoothed noise."""
    rng = np.random.default_rng(seed)
    out = np.zeros(shape, np.uint8)
    for value in range(1, 5):
        field = ndimage.gaussian_filter(rng.standard_normal(shape), smooth)
        out[field > np.quantile(field, 0.93)] = value
    return out


def one_hot(labels):
    t = torch.from_numpy(labels.astype(np.int64))
    return torch.nn.functional.one_hot(t, 5).permute(3, 0, 1, 2)[None].float()


def monai_scores(pred, ref, spacing, tolerance):
    from monai.metrics import (
        compute_confusion_matrix_metric,
        compute_dice,
        compute_hausdorff_distance,
        compute_surface_dice,
        get_confusion_matrix,
    )

    p, r = one_hot(pred), one_hot(ref)
    cm = get_confusion_matrix(p, r, include_background=False)
    return {
        "dice": compute_dice(p, r, include_background=False)[0].numpy(),
        "precision": compute_confusion_matrix_metric("precision", cm)[0].numpy(),
        "recall": compute_confusion_matrix_metric("sensitivity", cm)[0].numpy(),
        "hd95_mm": compute_hausdorff_distance(p, r, include_background=False, percentile=95,
                                              spacing=list(spacing))[0].numpy(),
        "nsd": compute_surface_dice(p, r, [tolerance] * 4, include_background=False, spacing=list(spacing))[0].numpy(),
    }


def assert_agree(pred, ref, spacing, tolerance=2.0):
    ours = organ_metrics(pred, ref, spacing, tolerance)
    theirs = monai_scores(pred, ref, spacing, tolerance)
    for i, organ in enumerate(ORGANS):
        if not ((pred == i + 1).any() and (ref == i + 1).any()):
            continue  # MONAI gives NaN for an organ absent from a map; ours is covered by test_empty_masks
        for m in ("dice", "precision", "recall", "nsd"):
            assert ours[organ][m] == pytest.approx(float(theirs[m][i]), abs=1e-4), (organ, m)
        assert abs(ours[organ]["hd95_mm"] - float(theirs["hd95_mm"][i])) <= max(spacing), organ
    return ours, theirs


@pytest.mark.parametrize("seed,spacing", [(0, (1.0, 1.0, 1.0)), (1, (0.8, 1.2, 2.5)), (2, (3.0, 0.7, 1.6))])
def test_random_masks_agree_with_monai(seed, spacing):
    ref = random_labels((48, 40, 32), seed)
    pred = random_labels((48, 40, 32), seed + 100) if seed == 2 else ndimage.shift(ref, (1, -2, 1), order=0)
    ours, theirs = assert_agree(pred, ref, spacing)
    # HD95 is computed the same way, so it agrees far better than the one-voxel tolerance.
    for i, organ in enumerate(ORGANS):
        assert ours[organ]["hd95_mm"] == pytest.approx(float(theirs["hd95_mm"][i]), abs=1e-3)


def test_surface_distances_equal_the_distance_transform():
    pred, ref = random_labels((40, 36, 24), 5) == 1, random_labels((40, 36, 24), 6) == 1
    spacing = (0.7, 1.1, 2.5)
    to_ref, to_pred = surface_distances(pred, ref, spacing)
    edt_ref = ndimage.distance_transform_edt(~surface(ref), sampling=spacing)[surface(pred)]
    edt_pred = ndimage.distance_transform_edt(~surface(pred), sampling=spacing)[surface(ref)]
    np.testing.assert_allclose(np.sort(to_ref), np.sort(edt_ref), atol=1e-9)
    np.testing.assert_allclose(np.sort(to_pred), np.sort(edt_pred), atol=1e-9)


def test_volumes_and_differences():
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[2:6, 2:6, 2:6] = 1  # 64 voxels
    pred = np.zeros_like(ref)
    pred[2:6, 2:6, 2:4] = 1  # 32 voxels, all inside
    m = organ_metrics(pred, ref, (2.0, 2.0, 2.5))["liver"]
    voxel_ml = 2 * 2 * 2.5 / 1000
    assert m["ref_ml"] == pytest.approx(64 * voxel_ml)
    assert m["pred_ml"] == pytest.approx(32 * voxel_ml)
    assert m["vol_diff_ml"] == pytest.approx(-32 * voxel_ml)
    assert m["vol_diff_pct"] == pytest.approx(-50.0)
    assert m["precision"] == 1.0 and m["recall"] == 0.5 and m["dice"] == pytest.approx(2 * 32 / 96)


def tilted_affine(degrees=25.0, spacing=(0.8, 1.1, 2.5)):
    """A gantry-tilted grid as read from DICOM: slices stacked along z, their rows tilted about x."""
    t = np.radians(degrees)
    affine = np.eye(4)
    affine[:3, :3] = [[spacing[0], 0, 0], [0, spacing[1] * np.cos(t), 0], [0, spacing[1] * np.sin(t), spacing[2]]]
    affine[:3, 3] = [-100.0, -80.0, 40.0]
    return affine


def brute_force_distances(a, b, affine):
    """Every surface voxel of a to its nearest surface voxel of b, both mapped through the affine (mm)."""
    from scipy.spatial.distance import cdist

    pa = np.argwhere(surface(np.pad(a, 1))) @ affine[:3, :3].T
    pb = np.argwhere(surface(np.pad(b, 1))) @ affine[:3, :3].T
    return cdist(pa, pb).min(1)


def test_sheared_grid_volumes_and_distances_are_physical():
    affine = tilted_affine()
    ref = random_labels((30, 26, 14), 7)
    pred = ndimage.shift(ref, (1, -1, 1), order=0)
    m = organ_metrics(pred, ref, affine, tolerance=2.0)
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    assert voxel_ml == pytest.approx(np.prod(spacing_of(affine)) / 1000 * np.cos(np.radians(25)))
    for value, organ in enumerate(ORGANS, start=1):
        p, r = pred == value, ref == value
        assert m[organ]["ref_ml"] == pytest.approx(np.count_nonzero(r) * voxel_ml)
        assert m[organ]["pred_ml"] == pytest.approx(np.count_nonzero(p) * voxel_ml)
        d_pr, d_rp = brute_force_distances(p, r, affine), brute_force_distances(r, p, affine)
        to_ref, to_pred = surface_distances(p, r, affine)
        np.testing.assert_allclose(np.sort(to_ref), np.sort(d_pr), atol=1e-9)
        np.testing.assert_allclose(np.sort(to_pred), np.sort(d_rp), atol=1e-9)
        hd = max(np.quantile(d_pr, 0.95), np.quantile(d_rp, 0.95))
        nsd = (np.count_nonzero(d_pr <= 2.0 + 1e-6) + np.count_nonzero(d_rp <= 2.0 + 1e-6)) / (d_pr.size + d_rp.size)
        assert m[organ]["hd95_mm"] == pytest.approx(hd, abs=1e-9) and m[organ]["nsd"] == pytest.approx(nsd)
    # An axis-aligned affine, flipped and permuted as LPS files are, gives the spacing's (MONAI's) figures.
    lps = np.diag([-0.8, -1.1, 2.5, 1.0])[:, [1, 0, 2, 3]]
    by_affine, by_spacing = organ_metrics(pred, ref, lps), organ_metrics(pred, ref, spacing_of(lps))
    for organ in ORGANS:
        assert by_affine[organ] == pytest.approx(by_spacing[organ])


def test_empty_masks_are_defined():
    empty = np.zeros((8, 8, 8), bool)
    full = empty.copy()
    full[2:5, 2:5, 2:5] = True
    assert overlap_scores(empty, empty) == {"dice": 1.0, "precision": 1.0, "recall": 1.0}
    assert overlap_scores(full, empty) == {"dice": 0.0, "precision": 0.0, "recall": 0.0}
    assert hd95_nsd(empty, empty, (1, 1, 1)) == (0.0, 1.0)
    assert hd95_nsd(full, empty, (1, 1, 1)) == (math.inf, 0.0)
    assert hd95_nsd(empty, full, (1, 1, 1)) == (math.inf, 0.0)
    lab = full.astype(np.uint8)  # liver only: kidneys and spleen absent from both
    m = organ_metrics(lab, lab, (1, 1, 1))
    assert m["spleen"]["dice"] == 1.0 and m["spleen"]["hd95_mm"] == 0.0 and m["spleen"]["vol_diff_pct"] is None


def test_mask_touching_the_border_agrees_with_monai():
    ref = np.zeros((20, 20, 12), np.uint8)
    ref[:8, 5:15, :] = 1
    ref[12:, :6, 3:9] = 4
    pred = ref.copy()
    pred[:9, 5:14, 1:] = 1
    pred[12:, :6, 3:9] = 0
    pred[14:, :4, 2:9] = 4
    assert_agree(pred, ref, (1.5, 1.0, 3.0))


def test_reports_hold_cases_mean_and_no_nan(tmp_path):
    ref = random_labels((24, 24, 16), 3)
    pred = ref.copy()
    pred[pred == 4] = 0  # spleen missed: HD95 inf
    cases = {"a": organ_metrics(pred, ref, (1, 1, 1)), "b": organ_metrics(ref, ref, (1, 1, 1))}
    csv_path, json_path = write_reports(cases, tmp_path / "metrics", 2.0)
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("case,liver_dice,") and [ln.split(",")[0] for ln in lines[1:]] == ["a", "b", "mean"]
    assert "inf" in lines[1] and "nan" not in csv_path.read_text().lower()
    report = json.loads(json_path.read_text())
    assert report["cases"]["a"]["spleen"]["hd95_mm"] is None
    assert report["mean"]["spleen"]["hd95_mm"] == 0.0 and report["hd95_cases_in_mean"]["spleen"] == 1
    assert report["mean"]["spleen"]["dice"] == pytest.approx(0.5)
    assert report["mean"]["liver"]["dice"] == 1.0


# ---------------------------------------------------------------------------------------------
# Real masks


def _ircad_crop():
    label, affine = load_nifti(REAL / "ircad_p1" / "label.nii.gz", "label")
    box = ndimage.find_objects((label > 0).astype(np.uint8))[0]
    box = tuple(slice(max(s.start - 3, 0), s.stop + 3) for s in box)
    # Every second voxel in-plane keeps the test quick; the masks stay real anatomy.
    sub = label[box][::2, ::2]
    spacing = spacing_of(affine) * np.array([2, 2, 1])
    return np.ascontiguousarray(sub), tuple(float(s) for s in spacing)


@needs_real
def test_real_masks_agree_with_monai():
    ref, spacing = _ircad_crop()
    pred = ref.copy()
    liver = ref == 1
    pred[liver & ~ndimage.binary_erosion(liver, iterations=2)] = 0  # liver shrunk by 2 voxels
    pred[pred == 2] = 0
    pred[(ndimage.shift((ref == 2).astype(np.uint8), (2, 0, 1), order=0) > 0) & (pred == 0)] = 2  # kidney moved
    pred[ndimage.binary_dilation(ref == 4) & (pred == 0)] = 4  # spleen grown by a voxel
    assert_agree(pred, ref, spacing)


@needs_real
@pytest.mark.parametrize("case,label_map", [("ircad_p1/label.nii.gz", "identity"),
                                            ("totalseg_example/segmentation.nii.gz", "totalseg")])
def test_reference_against_itself_is_perfect(case, label_map):
    from dataset import remap_labels

    label, affine = load_nifti(REAL / case, "label")
    ref = remap_labels(label, label_map)
    scores = organ_metrics(ref, ref, spacing_of(affine))
    for organ in ORGANS:
        assert scores[organ]["dice"] == 1.0 and scores[organ]["hd95_mm"] == 0.0 and scores[organ]["nsd"] == 1.0
        assert scores[organ]["precision"] == 1.0 and scores[organ]["recall"] == 1.0
        assert scores[organ]["ref_ml"] > 1.0, organ  # every organ is present in both references


@pytest.mark.parametrize("order", ["F", "C"])
@pytest.mark.parametrize("fill", ["boxes", "scan"])
def test_organ_statistics_are_exact_whether_gathered_per_box_or_in_one_pass(order, fill):
    """Voxels, mean and median HU per organ equal numpy's, both when the organs sit in small boxes (gathered per
    box) and when their boxes cover the scan (one histogram pass over it, as an untrained model's mask does)."""
    rng = np.random.default_rng(0)
    hu = np.asarray(rng.integers(-1024, 1500, (40, 36, 30)), dtype=np.int16, order=order)
    labels = np.zeros(hu.shape, np.uint8, order=order)
    if fill == "scan":
        labels[...] = rng.integers(0, 5, hu.shape)
    else:
        for value, corner in enumerate([(2, 2, 2), (20, 2, 2), (2, 20, 2), (20, 20, 15)], start=1):
            labels[tuple(slice(c, c + 8 + value) for c in corner)] = value
    stats = organ_statistics(labels, hu, np.diag([0.8, 0.8, 2.0, 1.0]))
    for value, organ in enumerate(ORGANS, start=1):
        values = hu[labels == value].astype(np.float64)
        assert stats[organ]["voxels"] == values.size
        assert stats[organ]["volume_ml"] == pytest.approx(values.size * 0.8 * 0.8 * 2.0 / 1000)
        assert stats[organ]["mean_hu"] == pytest.approx(values.mean(), rel=1e-12)
        assert stats[organ]["median_hu"] == float(np.median(values))
