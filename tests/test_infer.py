"""infer.py and the inference helpers of utils.py: MONAI-equivalent sliding window, exact return to
the input grid, post-processing, mirroring TTA, the CLI's outputs and its errors."""

import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REAL, ROOT, needs_real

import infer
from phantom import make_phantom, reorient_for_writing
from utils import (
    CHECKPOINT_FORMAT,
    LABELS,
    Preprocessing,
    UserError,
    find_boxes,
    gaussian_importance,
    label_counts,
    load_nifti,
    preprocess_image,
    probs_to_input_grid,
    resample,
    sliding_window_inference,
    undo_reorient,
    window_starts,
)
from vnet import build_vnet

GRID = 6.0  # mm: the tiny checkpoint's grid, coarse so tests take seconds


def make_checkpoint(path, spacing=GRID, roi=32, background_bias=0.0, **overrides):
    torch.manual_seed(0)
    model = build_vnet("small", base_width=4, **overrides)
    with torch.no_grad():
        model.output.head.bias[0] += background_bias  # fewer, smaller random organs: quicker real-scan tests
    prep = Preprocessing(spacing=(spacing,) * 3, mean=100.0, std=80.0)
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": model.cfg.to_dict(),
                "preprocessing": prep.to_dict(), "labels": {str(k): v for k, v in LABELS.items()},
                "roi_size": [roi] * 3, "epoch": 0, "metrics": {}}, path)
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """A phantom at 4 mm written in LPS: (image path, label path)."""
    folder = tmp_path_factory.mktemp("scan")
    hu, label, affine = make_phantom(3, spacing=(4.0, 4.0, 4.0))
    hu, label, affine = reorient_for_writing(hu, label, affine, "LPS")
    img = nib.Nifti1Image(hu, affine)
    img.set_qform(affine, code=1)
    nib.save(img, folder / "case_0000.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), folder / "case_label.nii.gz")
    return folder / "case_0000.nii.gz", folder / "case_label.nii.gz"


def run(args):
    return infer.main(infer.parse_args([*args, "--device", "cpu", "--quiet"]))


# ---------------------------------------------------------------------------------------------
# Sliding window against MONAI


@pytest.mark.parametrize("dtype,shape,gz", [("<i2", (9, 10, 11), True), (">i2", (9, 10, 11), True),
                                             ("<f4", (9, 10, 11, 1), True), ("<u1", (9, 10, 11), False)])
def test_load_nifti_reads_what_nibabel_reads(dtype, shape, gz, tmp_path):
    """The ISA-L reading of an unscaled .nii.gz gives nibabel's array: values, dtype, byte order and
    Fortran order (trailing axes of size 1 dropped); other files go through nibabel."""
    data = np.random.default_rng(0).integers(-1000, 1000, shape).astype(dtype)
    path = tmp_path / ("ct.nii.gz" if gz else "ct.nii")
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 0.7, 2.5, 1.0])), str(path))
    expected = np.asarray(nib.load(str(path)).dataobj).reshape(shape[:3], order="F")
    array, _ = load_nifti(path)
    assert array.dtype == expected.dtype and array.flags.f_contiguous
    np.testing.assert_array_equal(array, expected)


def test_gaussian_and_window_starts_match_monai():
    from monai.data.utils import compute_importance_map, dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    for roi in [(32, 32, 32), (16, 48, 33), (7, 64, 20)]:
        ours = gaussian_importance(roi)
        theirs = compute_importance_map(roi, mode="gaussian", sigma_scale=0.125)
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    for size, roi, overlap in [(100, 32, 0.5), (64, 64, 0.5), (70, 32, 0.25), (33, 32, 0.6), (200, 48, 0.0)]:
        interval = _get_scan_interval((size,), (roi,), 1, (overlap,))
        theirs = [s[0].start for s in dense_patch_slices((size,), (roi,), interval)]
        assert window_starts(size, roi, overlap) == theirs, (size, roi, overlap)


def context_predictor(w):
    """Output depends on each window's content as a whole: blending differences would show."""
    return torch.cat([w, w - w.mean((2, 3, 4), keepdim=True), torch.sigmoid(w * 3)], 1)


@pytest.mark.parametrize("shape,roi,overlap", [((50, 41, 37), (32, 32, 16), 0.5), ((20, 70, 33), (32, 32, 32), 0.25),
                                               ((64, 48, 40), (32, 16, 32), 0.6)])
def test_sliding_window_matches_monai(shape, roi, overlap):
    from monai.inferers import sliding_window_inference as monai_swi

    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(0))
    ours = sliding_window_inference(x, roi, 3, context_predictor, overlap=overlap, pad_value=-1.5)
    theirs = monai_swi(x, roi, 3, context_predictor, overlap=overlap, mode="gaussian", cval=-1.5)
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, torch.as_tensor(theirs), atol=1e-4, rtol=0)


def test_sliding_window_with_vnet_matches_monai():
    from monai.inferers import sliding_window_inference as monai_swi

    torch.manual_seed(0)
    model = build_vnet("small", base_width=4).eval()
    x = torch.randn(1, 1, 40, 52, 30)
    with torch.inference_mode():
        ours = sliding_window_inference(x, (32, 32, 32), 2, model, overlap=0.5)
        theirs = monai_swi(x, (32, 32, 32), 2, model, overlap=0.5, mode="gaussian")
    torch.testing.assert_close(ours, torch.as_tensor(theirs), atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------------------------
# Back to the input grid


def reference_to_input_grid(probs, info):
    """The plain method: every class trilinearly at full size, argmax, original axes."""
    full = torch.stack([resample(p.float(), info.canonical_shape) for p in probs])
    return undo_reorient(full.argmax(0).to(torch.uint8).numpy(), info.transform)


@pytest.mark.parametrize("scale,order", [((0.57, 0.57, 1.6), "F"), ((3.0, 2.0, 5.0), "C")])
@pytest.mark.parametrize("background", [1.5, 0.0])
def test_probs_to_input_grid_equals_full_resampling(scale, order, background):
    # background 1.5: mostly background, as in a scan, so slabs skip their settled voxels; 0: nothing settles
    # (an untrained model), so slabs take the argmax of every voxel instead of gathering the unsettled ones
    from phantom import Grid

    shape = (70, 60, 24) if scale[0] < 1 else (30, 25, 12)
    affine = Grid(shape, scale, (0, 0, 0)).affine
    hu, _, lps_affine = reorient_for_writing(np.zeros(shape, np.int16), np.zeros(shape, np.uint8), affine, "LPS")
    hu = np.asarray(hu, order=order)  # NIfTI arrays come in Fortran order
    _, info = preprocess_image(hu, lps_affine, Preprocessing(spacing=(1.5, 1.5, 1.5)))
    g = torch.Generator().manual_seed(1)
    logits = torch.nn.functional.avg_pool3d(torch.randn(5, *info.shape_out, generator=g)[None] * 8, 3, 1, 1)[0]
    logits[0] += background
    probs = logits.softmax(0)
    ours = probs_to_input_grid(probs, info, slab=5)
    expected = reference_to_input_grid(probs, info)
    assert ours.shape == hu.shape and ours.dtype == np.uint8
    assert ours.flags.f_contiguous == (order == "F")  # the input's memory order: no transposing copy
    assert (ours != expected).mean() < 1e-4
    assert 0.05 < (ours > 0).mean() < 0.95 if background else (ours > 0).mean() > 0.6


def test_keep_largest_components():
    lab = np.zeros((30, 30, 30), np.uint8)
    lab[2:12, 2:12, 2:12] = 1
    lab[20:23, 20:23, 20:23] = 1  # a stray liver island
    lab[15:18, 2:5, 2:5] = 2
    lab[18:19, 5:6, 5:6] = 2  # touches the right kidney at a corner: 26-connected, kept
    out = infer.keep_largest_components(lab.copy())
    assert (out[20:23, 20:23, 20:23] == 0).all()
    assert (out[2:12, 2:12, 2:12] == 1).all()
    assert (out == 2).sum() == (lab == 2).sum()


def test_fill_enclosed_holes_fills_cavities_only():
    lab = np.zeros((30, 30, 30), np.uint8)
    lab[2:14, 2:14, 2:14] = 1
    lab[5:9, 5:9, 5:9] = 0  # a lesion left out, enclosed: liver
    lab[10:12, 10:12, 10:12] = 2  # something else inside: kept
    lab[2:5, 2:4, 2:4] = 0  # a notch open to the outside: kept
    lab[16:26, 16:26, 16:26] = 4
    lab[20:22, 20:22, 16:26] = 0  # a tunnel through the spleen (a vessel): kept
    out = infer.fill_enclosed_holes(lab.copy())
    assert (out[5:9, 5:9, 5:9] == 1).all() and (out[10:12, 10:12, 10:12] == 2).all()
    changed = out != lab
    assert changed.sum() == 4 ** 3
    assert np.array_equal(infer.fill_enclosed_holes(np.asfortranarray(lab)), out)


def test_keep_largest_components_same_in_either_memory_order():
    """A Fortran-order map (labelled through its transpose) keeps the same components as the same
    map in C order, equal sizes included (the first in X, Y, Z order wins)."""
    rng = np.random.default_rng(0)
    for _ in range(10):
        lab = ((rng.random((12, 9, 7)) < 0.05) * rng.integers(1, 5, (12, 9, 7))).astype(np.uint8)
        expected = infer.keep_largest_components(np.ascontiguousarray(lab))
        ours = infer.keep_largest_components(np.asfortranarray(lab))
        assert np.array_equal(ours, expected) and ours.flags.f_contiguous


def test_find_boxes_is_find_objects_in_either_memory_order():
    from scipy import ndimage

    lab = ((np.random.default_rng(0).random((20, 15, 9)) < 0.03) * 3).astype(np.uint8)
    lab[2, 3, 4] = 1
    expected = ndimage.find_objects(lab, max_label=4)
    assert find_boxes(np.asfortranarray(lab), 4) == find_boxes(lab, 4) == expected


def test_label_counts_is_bincount():
    lab = np.asfortranarray(np.random.default_rng(0).integers(0, 5, (9, 8, 7)).astype(np.uint8))
    assert np.array_equal(label_counts(lab), np.bincount(lab.ravel(), minlength=5))
    assert np.array_equal(label_counts(lab[::-1, :, ::2], 7), np.bincount(lab[::-1, :, ::2].ravel(), minlength=7))


def test_fold_batchnorm_keeps_the_function():
    torch.manual_seed(0)
    model = build_vnet("small", base_width=4)
    for m in model.modules():  # non-trivial statistics, as after training
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    model.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.inference_mode():
        before = model(x)
    infer.fold_batchnorm(model)
    with torch.inference_mode():
        after = model(x)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in model.modules())
    torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)


class SidedStub(torch.nn.Module):
    """Calls a bright voxel a right kidney on the window's high-x half (the patient's right in RAS)
    and a left kidney on the other half: what an anatomically trained network does."""

    def forward(self, x):
        ramp = torch.linspace(-1, 1, x.shape[2]).view(1, 1, -1, 1, 1)
        bright = x * 4
        zeros = torch.zeros_like(x)
        return torch.cat([zeros + 0.5, zeros, bright * ramp, bright * -ramp, zeros], 1)


def test_mirroring_tta_swaps_kidneys_back(ckpt):
    seg = infer.Segmenter(ckpt, torch.device("cpu"), tta_axes="0")
    seg.models = [SidedStub()]
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        tta = seg.predictor(x)
        seg.mirrors = []
        plain = seg.predictor(x)
    assert not torch.allclose(plain[:, 2], plain[:, 3])
    torch.testing.assert_close(tta, plain, atol=1e-6, rtol=0)
    assert len(infer.mirror_sets("012")) == 7


def test_tta_mirrors_only_the_axes_the_model_was_trained_mirroring(ckpt, tmp_path, capsys):
    saved = torch.load(ckpt, weights_only=True)
    saved["augmentation"] = {"flip_lr_prob": 0.5, "flip_ap_prob": 0.0, "flip_si_prob": 0.0}
    torch.save(saved, tmp_path / "lr.pt")
    assert infer.Segmenter(tmp_path / "lr.pt", torch.device("cpu"), tta_axes="").mirrors == [(0,)]
    saved["augmentation"]["flip_lr_prob"] = 0.0
    torch.save(saved, tmp_path / "none.pt")
    with pytest.raises(infer.UserError, match="no mirroring in its training.*--tta-axes"):
        infer.Segmenter(tmp_path / "none.pt", torch.device("cpu"), tta_axes="")
    assert len(infer.Segmenter(tmp_path / "none.pt", torch.device("cpu"), tta_axes="01").mirrors) == 3
    assert "not trained mirroring axis [0, 1]" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The command line


def assert_on_input_grid(out_path, in_path):
    a, b = nib.load(str(out_path)), nib.load(str(in_path))
    assert a.shape == b.shape
    assert np.allclose(a.affine, b.affine, atol=1e-5)
    assert np.allclose(a.get_sform(), b.affine, atol=1e-5) and np.allclose(a.get_qform(), b.affine, atol=1e-4)
    assert nib.aff2axcodes(a.affine) == nib.aff2axcodes(b.affine)
    data = np.asanyarray(a.dataobj)
    assert data.dtype == np.uint8 and data.max() <= 4
    return data


def test_end_to_end_file_with_metrics(ckpt, scan, tmp_path):
    image, label = scan
    out = tmp_path / "seg.nii.gz"
    summary = run(["--input", str(image), "--output", str(out), "--checkpoint", str(ckpt), "--label", str(label),
                   "--tta", "--tta-axes", "0"])
    assert_on_input_grid(out, image)
    assert (tmp_path / "seg.png").stat().st_size > 10_000
    result = summary["cases"]["case"]
    assert set(result["metrics"]) == {"liver", "right_kidney", "left_kidney", "spleen"}
    assert {"read", "preprocess", "network", "resample", "postprocess", "write", "png", "total"} <= set(
        result["timings"])
    assert (tmp_path / "seg_metrics.csv").exists() and (tmp_path / "seg_metrics.json").exists()
    with pytest.raises(UserError, match="exists; pass --overwrite"):
        run(["--input", str(image), "--output", str(out), "--checkpoint", str(ckpt)])
    run(["--input", str(image), "--output", str(out), "--checkpoint", str(ckpt), "--overwrite", "--no-png",
         "--no-postprocess"])


def test_mask_keeps_the_ct_qform_and_sform(ckpt, scan, tmp_path):
    """A CT whose qform (code 1) and sform (code 2) differ by 5 degrees and 3 mm: the mask carries
    both, with their codes, so a viewer reading either draws it on the CT."""
    src = nib.load(str(scan[0]))
    sform = src.affine
    turn = np.eye(4)
    turn[:2, :2] = [[np.cos(np.radians(5)), -np.sin(np.radians(5))], [np.sin(np.radians(5)), np.cos(np.radians(5))]]
    qform = turn @ sform
    qform[:3, 3] += [3.0, 0.0, 0.0]
    img = nib.Nifti1Image(np.asanyarray(src.dataobj), None, header=src.header.copy())
    img.set_sform(sform, code=2)
    img.set_qform(qform, code=1)
    image = tmp_path / "tilted.nii.gz"
    nib.save(img, image)
    out = tmp_path / "seg.nii.gz"
    run(["--input", str(image), "--output", str(out), "--checkpoint", str(ckpt), "--no-png"])
    mask = nib.load(str(out)).header
    assert mask.get_sform(coded=True)[1] == 2 and mask.get_qform(coded=True)[1] == 1
    np.testing.assert_allclose(mask.get_sform(), sform, atol=1e-5)
    np.testing.assert_allclose(mask.get_qform(), qform, atol=1e-4)


def test_volumes_on_a_tilted_grid_use_the_determinant(ckpt, scan, tmp_path):
    """A gantry-tilted (sheared) grid, as read_dicom_series gives: voxel volume |det(affine[:3, :3])|,
    about 10 % below the product of the voxel sizes at 25 degrees."""
    src = nib.load(str(scan[0]))
    affine = src.affine.copy()
    t = np.radians(25)
    affine[:3, 2] = affine[:3, 2] + np.tan(t) * np.linalg.norm(affine[:3, 2]) * affine[:3, 1] / np.linalg.norm(affine[:3, 1])
    image, label = tmp_path / "tilted.nii.gz", tmp_path / "tilted_label.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(src.dataobj), affine), image)
    nib.save(nib.Nifti1Image(np.asanyarray(nib.load(str(scan[1])).dataobj), affine), label)
    out = tmp_path / "seg.nii.gz"
    summary = run(["--input", str(image), "--output", str(out), "--checkpoint", str(ckpt), "--no-png",
                   "--label", str(label)])
    result = summary["cases"]["tilted"]
    voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
    assert voxel_ml < 0.95 * np.prod(np.linalg.norm(affine[:3, :3], axis=0)) / 1000
    counts = np.bincount(np.asanyarray(nib.load(str(out)).dataobj).ravel(), minlength=5)
    ref_counts = np.bincount(np.asanyarray(nib.load(str(label)).dataobj).ravel(), minlength=5)
    assert max(result["volumes_ml"].values()) > 10
    for value, organ in LABELS.items():
        if value:
            assert result["volumes_ml"][organ] == pytest.approx(counts[value] * voxel_ml, abs=0.051)
            assert result["metrics"][organ]["ref_ml"] == pytest.approx(ref_counts[value] * voxel_ml)


def test_folder_with_a_bad_case_continues(ckpt, scan, tmp_path):
    image, label = scan
    src = tmp_path / "in"
    src.mkdir()
    (src / "good_0000.nii.gz").write_bytes(image.read_bytes())
    (src / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    flat = nib.Nifti1Image(np.zeros((40, 40, 1), np.int16) - 1000, np.eye(4))
    nib.save(flat, src / "flat.nii.gz")
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "good.nii.gz").write_bytes(label.read_bytes())
    out = tmp_path / "out"
    with pytest.raises(UserError, match="2 of 3 scans failed"):
        run(["--input", str(src), "--output", str(out), "--checkpoint", str(ckpt), "--no-png", "--label", str(refs),
             "--metrics", str(tmp_path / "scores")])
    assert_on_input_grid(out / "good.nii.gz", image)
    assert sorted(p.name for p in out.iterdir()) == ["good.nii.gz", "good_statistics.json", "statistics.csv"]
    rows = (tmp_path / "scores.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["good", "mean"]


def test_statistics_for_every_scan_without_reference(ckpt, scan, tmp_path):
    """A folder of three scans (one oblique, one anisotropic), no --label: a JSON beside each mask
    and one CSV, volumes = voxel counts x |det(affine)|, HU and boxes from the CT itself."""
    import csv
    import json

    from metrics import STATISTICS, statistics_columns

    img = nib.load(scan[0])
    hu = np.asarray(img.dataobj)
    src = tmp_path / "in"
    src.mkdir()
    turn = np.eye(4)
    turn[:2, :2] = [[np.cos(0.4), -np.sin(0.4)], [np.sin(0.4), np.cos(0.4)]]
    stretch = np.diag([1.0, 1.0, 1.5, 1.0])
    for name, affine in [("a", img.affine), ("oblique", turn @ img.affine), ("thick", img.affine @ stretch)]:
        nib.save(nib.Nifti1Image(hu, affine), src / f"{name}_0000.nii.gz")
    out = tmp_path / "out"
    summary = run(["--input", str(src), "--output", str(out), "--checkpoint", str(ckpt), "--no-png"])
    rows = list(csv.DictReader((out / "statistics.csv").open()))
    assert list(rows[0]) == statistics_columns() and [r["case"] for r in rows] == ["a", "oblique", "thick"]
    assert summary["statistics_file"] == str(out / "statistics.csv")
    found = 0
    for row in rows:
        mask = nib.load(out / f"{row['case']}.nii.gz")
        labels, affine = np.asarray(mask.dataobj), mask.affine
        voxel_ml = abs(np.linalg.det(affine[:3, :3])) / 1000
        report = json.loads((out / f"{row['case']}_statistics.json").read_text())
        assert report["voxel_volume_ml"] == pytest.approx(voxel_ml)
        for value, organ in enumerate(("liver", "right_kidney", "left_kidney", "spleen"), start=1):
            stats = report["organs"][organ]
            assert set(stats) == set(STATISTICS)
            inside = labels == value
            assert stats["voxels"] == int(row[f"{organ}_voxels"]) == int(inside.sum())
            assert stats["volume_ml"] == pytest.approx(inside.sum() * voxel_ml, rel=1e-12)
            assert float(row[f"{organ}_volume_ml"]) == pytest.approx(stats["volume_ml"], rel=1e-12)
            if not inside.any():
                assert stats["mean_hu"] is None and row[f"{organ}_bbox_min_x_mm"] == ""
                continue
            assert stats["mean_hu"] == pytest.approx(hu[inside].mean())
            assert stats["median_hu"] == pytest.approx(np.median(hu[inside]))
            centres = nib.affines.apply_affine(affine, np.argwhere(inside))
            found += 1
            if row["case"] == "oblique":  # the world box of the index box's corners: it holds every centre
                assert np.all(np.array(stats["bbox_min_mm"]) <= centres.min(0) + 1e-6)
                assert np.all(np.array(stats["bbox_max_mm"]) >= centres.max(0) - 1e-6)
            else:
                np.testing.assert_allclose(stats["bbox_min_mm"], centres.min(0), atol=1e-6)
                np.testing.assert_allclose(stats["bbox_max_mm"], centres.max(0), atol=1e-6)
            np.testing.assert_allclose([float(row[f"{organ}_bbox_max_{a}_mm"]) for a in "xyz"], stats["bbox_max_mm"])
    assert found >= 6  # organs to measure in every case


def test_4d_input_keeps_its_shape_and_the_log_names_the_stored_type(ckpt, scan, tmp_path, capsys):
    """(X, Y, Z, 1) uint16 with a scaling to HU on an oblique grid: the mask has exactly that shape
    and grid, and the log line names the stored type and the obliquity."""
    img = nib.load(scan[0])
    stored = (np.asarray(img.dataobj).astype(np.int32) + 1024).astype(np.uint16)[..., None]
    turn = np.eye(4)
    turn[:2, :2] = [[np.cos(0.3), -np.sin(0.3)], [np.sin(0.3), np.cos(0.3)]]
    ct = nib.Nifti1Image(stored, turn @ img.affine)
    ct.header.set_slope_inter(1.0, -1024.0)
    nib.save(ct, tmp_path / "ct.nii.gz")
    out = tmp_path / "seg.nii.gz"
    infer.main(infer.parse_args(["--input", str(tmp_path / "ct.nii.gz"), "--output", str(out), "--checkpoint", str(ckpt),
                                 "--device", "cpu", "--no-png"]))
    mask = nib.load(out)
    assert mask.shape == stored.shape
    np.testing.assert_allclose(mask.affine, ct.affine, atol=1e-5)
    line = next(li for li in capsys.readouterr().out.splitlines() if li.startswith("ct: "))
    assert line.startswith(f"ct: {'x'.join(map(str, stored.shape))} ") and " oblique " in line, line
    assert "uint16 x1 -1024" in line and "float" not in line, line


@pytest.mark.parametrize("problem", ["missing", "2d", "other_model", "corrupt", "state_dict", "missing_folder",
                                     "ref_shape"])
def test_bad_input_is_one_clear_error(problem, ckpt, scan, tmp_path):
    image, label = scan
    out = tmp_path / "seg.nii.gz"
    args = ["--input", str(image), "--output", str(out), "--checkpoint", str(ckpt), "--no-png"]
    culprit = None
    if problem == "missing":
        culprit = tmp_path / "nope.nii.gz"
        args[1] = str(culprit)
    elif problem == "2d":
        culprit = tmp_path / "slice.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((64, 64), np.int16), np.eye(4)), culprit)
        args[1] = str(culprit)
    elif problem in ("other_model", "corrupt", "state_dict"):
        culprit = tmp_path / "bad.pt"
        if problem == "other_model":
            make_checkpoint(culprit, num_classes=3)
        elif problem == "corrupt":
            culprit.write_bytes(ckpt.read_bytes()[:5000])
        else:
            torch.save(build_vnet("small", base_width=4).state_dict(), culprit)
        args[5] = str(culprit)
    elif problem == "missing_folder":
        culprit = tmp_path / "no" / "such"
        out = culprit / "seg.nii.gz"
        args[3] = str(out)
    elif problem == "ref_shape":
        culprit = tmp_path / "small_ref.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)), culprit)
        args += ["--label", str(culprit)]
    with pytest.raises(UserError) as e:
        run(args)
    assert str(culprit) in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() and not list(tmp_path.glob(".*tmp*"))


def test_cli_error_exit_code_and_one_line(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--input", str(tmp_path / "none.nii.gz"),
                        "--output", str(tmp_path / "o.nii.gz")], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "none.nii.gz" in r.stderr


def test_checkpoint_argument_takes_a_run_folder(tmp_path):
    assert infer.resolve_checkpoint("") == infer.SHIPPED
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(UserError, match="folder without best.pt"):
        infer.resolve_checkpoint(str(run))
    make_checkpoint(run / "best.pt")
    assert infer.resolve_checkpoint(str(run)) == run / "best.pt"
    assert infer.resolve_checkpoint(str(run / "best.pt")) == run / "best.pt"
    assert infer.model_card({}, infer.SHIPPED) == "docs/MODEL_CARD.md"
    assert infer.model_card({"model_card": "https://example.org/card"}, run / "best.pt") == "https://example.org/card"
    assert infer.model_card({}, run / "best.pt").startswith("none (a train.py run")


def test_fresh_clone_after_training_uses_the_shipped_model(tiny_dataset, scan, tmp_path):
    """A clone, then python train.py (a tiny run into checkpoints/RUN/best.pt), then python infer.py:
    the shipped model is used, and named with its card."""
    import shutil

    from test_train import FAST

    clone = tmp_path / "clone"
    (clone / "checkpoints").mkdir(parents=True)
    (clone / "docs").mkdir()
    for module in ROOT.glob("*.py"):
        shutil.copy(module, clone)
    shutil.copy(infer.SHIPPED, clone / "checkpoints")
    shutil.copy(infer.MODEL_CARD, clone / "docs")
    r = subprocess.run([sys.executable, "train.py", *FAST, "--data", str(tiny_dataset), "--epochs", "1",
                        "--run", "mine"], cwd=clone, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (clone / "checkpoints" / "mine" / "best.pt").is_file()
    r = subprocess.run([sys.executable, "infer.py", "--input", str(scan[0]), "--output", str(tmp_path / "a.nii.gz"),
                        "--device", "cpu", "--no-png"], cwd=clone, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    members = len(torch.load(infer.SHIPPED, weights_only=True).get("members") or [None])
    ensemble = f", an ensemble of {members}" if members > 1 else ""
    assert r.stdout.splitlines()[0] == (f"model {clone / 'checkpoints' / 'phantom_small.pt'}{ensemble} "
                                        f"(card: docs/MODEL_CARD.md)")


# ---------------------------------------------------------------------------------------------
# Real scans


@needs_real
@pytest.mark.parametrize("image,label,label_map", [
    ("ircad_p1/image.nii.gz", "ircad_p1/label.nii.gz", "identity"),
    ("totalseg_example/ct.nii.gz", "totalseg_example/segmentation.nii.gz", "totalseg"),
])
def test_real_scan_output_on_its_grid(image, label, label_map, tmp_path):
    ckpt = make_checkpoint(tmp_path / "bg.pt", background_bias=3.0)
    out = tmp_path / "seg.nii.gz"
    summary = run(["--input", str(REAL / image), "--output", str(out), "--checkpoint", str(ckpt),
                   "--label", str(REAL / label), "--label-map", label_map])
    assert_on_input_grid(out, REAL / image)
    (result,) = summary["cases"].values()
    assert set(result["metrics"]) == set(LABELS.values()) - {"background"}
    # The reference itself through the same reading path scores perfectly.
    from metrics import organ_metrics
    from utils import load_nifti, spacing_of

    _, affine = load_nifti(REAL / image)
    ref = infer.read_reference(REAL / label, label_map, nib.load(str(REAL / image)).shape, affine)
    scores = organ_metrics(ref, ref, spacing_of(affine))
    assert all(s["dice"] == 1.0 and s["hd95_mm"] == 0.0 for s in scores.values())


def test_fill_sectional_holes_fills_lesions_open_through_a_gap_only():
    lab = np.zeros((30, 30, 30), np.uint8)
    lab[2:20, 2:20, 2:20] = 1
    lab[8:14, 8:14, 8:14] = 0  # a lesion left out...
    lab[2:8, 10, 10] = 0  # ...joined to the outside by a one-voxel gap: no 3D cavity
    lab[14:20, 4, 2:20] = 0  # a vessel through the liver, head to feet: a hole in one plane only
    lab[2:5, 15:18, 15:18] = 0  # a notch open to the outside
    lab[22:28, 22:28, 22:28] = 2
    lab[24:26, 24:26, 24:26] = 0  # a right kidney's sinus: kidneys are left as they are
    lab[24, 25, 22:24] = 0
    assert np.array_equal(infer.fill_enclosed_holes(lab.copy()), lab)
    out = infer.fill_sectional_holes(lab.copy())
    lesion = np.zeros(lab.shape, bool)
    lesion[8:14, 8:14, 8:14] = True
    assert (out[lesion] == 1).mean() > 0.9
    assert (out[~lesion] == lab[~lesion]).all()  # vessel, notch, gap and kidney untouched
    assert np.array_equal(infer.fill_sectional_holes(np.asfortranarray(lab)), out)
