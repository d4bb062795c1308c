import nibabel as nib
import numpy as np
import pytest
import torch

from dataset import (
    AugmentConfig,
    PatchDataset,
    Volume,
    find_cases,
    load_case,
    remap_labels,
    spatial_matrix,
    warp_patch,
)
from phantom import make_phantom, reorient_for_writing
from utils import (
    Preprocessing,
    UserError,
    preprocess_image,
    preprocess_label,
    probs_to_input_grid,
    save_nifti,
)


def test_phantom_is_reproducible_and_anatomical():
    hu1, lab1, aff1 = make_phantom(7, spacing=(4.0, 4.0, 4.0))
    hu2, lab2, aff2 = make_phantom(7, spacing=(4.0, 4.0, 4.0))
    assert np.array_equal(hu1, hu2) and np.array_equal(lab1, lab2) and np.array_equal(aff1, aff2)
    assert not np.array_equal(make_phantom(8, spacing=(4.0, 4.0, 4.0))[0].shape, hu1.shape) or \
        not np.array_equal(make_phantom(8, spacing=(4.0, 4.0, 4.0))[0], hu1)
    assert hu1.dtype == np.int16 and lab1.dtype == np.uint8
    assert set(np.unique(lab1)) == {0, 1, 2, 3, 4}

    def world_x(value):  # RAS: +x is the patient's right
        return (aff1 @ np.r_[np.argwhere(lab1 == value).mean(0), 1])[0]

    assert world_x(1) > 0 > world_x(4)  # liver right, spleen left
    assert world_x(2) > 0 > world_x(3)  # right kidney on the right
    vox_ml = np.prod(np.diag(aff1)[:3]) / 1000
    assert 900 < (lab1 == 1).sum() * vox_ml < 2600
    # HU overlap: liver and spleen intensities are not separable by a threshold.
    liver, spleen = np.median(hu1[lab1 == 1]), np.median(hu1[lab1 == 4])
    assert abs(float(liver) - float(spleen)) < 60


def test_left_right_flip_swaps_kidney_labels():
    label = torch.zeros(16, 16, 16, dtype=torch.uint8)
    label[11:14, 6:10, 6:10] = 2  # right kidney: high axis-0 index is the patient's right (RAS)
    label[2:5, 6:10, 6:10] = 3
    image = label[None].float()
    matrix = np.diag([-1.0, 1.0, 1.0])
    _, out = warp_patch(image, label, matrix, True, (16, 16, 16))
    right_before = torch.argwhere(label == 2)[:, 0].float().mean()
    left_after = torch.argwhere(out == 3)[:, 0].float().mean()
    assert left_after < 8 < right_before  # the former right kidney now lies on the left...
    assert torch.equal(out == 3, torch.flip(label == 2, dims=[0]))  # ...and is labelled left
    assert torch.equal(out == 2, torch.flip(label == 3, dims=[0]))


def test_spatial_matrix_reports_lr_mirror():
    aug = AugmentConfig(rotate_prob=0, scale_prob=0, flip_lr_prob=1.0)
    matrix, mirrored = spatial_matrix(np.random.default_rng(0), aug)
    assert mirrored and matrix[0, 0] == -1


def _volumes():
    hu, lab, _ = make_phantom(3, spacing=(6.0, 6.0, 6.0))
    return [Volume("a", np.clip(hu, -200, 400).astype(np.float32), lab)]


def test_patches_are_reproducible_and_foreground_oversampled():
    prep = Preprocessing(mean=100.0, std=50.0)
    ds = PatchDataset(_volumes(), prep, (16, 16, 16), 40, AugmentConfig(), seed=3, foreground_prob=1.0)
    ds.set_epoch(2)
    a_img, a_lab = ds[5]
    b_img, b_lab = ds[5]
    assert torch.equal(a_img, b_img) and torch.equal(a_lab, b_lab)
    assert a_img.shape == (1, 16, 16, 16) and a_lab.shape == (16, 16, 16) and a_lab.dtype == torch.uint8
    organs = {int(v) for i in range(40) for v in torch.unique(ds[i][1])} - {0}
    assert organs == {1, 2, 3, 4}
    ds.set_epoch(3)
    assert not torch.equal(ds[5][0], a_img)


def test_loader_ships_uint8_labels():
    """Loader workers hand batches over in shared memory: uint8 labels take an eighth of int64's
    (Docker's 64 MB /dev/shm gave "Bus error" at the first batch); train.py widens them on the device."""
    for warp in (0.0, 1.0):  # the plain crop and the warped patch
        aug = AugmentConfig(rotate_prob=warp, scale_prob=warp)
        ds = PatchDataset(_volumes(), Preprocessing(mean=100.0, std=50.0), (16, 16, 16), 4, aug, seed=1)
        image, label = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
        assert image.dtype == torch.float32 and label.dtype == torch.uint8 and label.shape == (4, 16, 16, 16)


def test_flare22_map_and_unknown_values():
    src = np.array([0, 1, 2, 3, 13, 5, 11], dtype=np.uint16)
    assert remap_labels(src, "flare22").tolist() == [0, 1, 2, 4, 3, 0, 0]
    with pytest.raises(UserError, match=r"lab.nii.gz: label values \[7\] are not in the 'identity'"):
        remap_labels(np.array([0, 1, 7]), "identity", "lab.nii.gz")


@pytest.mark.parametrize("code", ["LPS", "LAS", "RAS"])
def test_geometry_round_trip_any_orientation(code):
    hu, lab, aff = make_phantom(5, spacing=(3.0, 3.0, 5.0))
    hu, lab, aff = reorient_for_writing(hu, lab, aff, code)
    prep = Preprocessing(spacing=(4.0, 4.0, 4.0))
    image, info = preprocess_image(hu, aff, prep)
    assert info.canonical_shape == tuple(np.array(hu.shape)[np.argsort([int(t[0]) for t in info.transform])]) \
        or len(info.canonical_shape) == 3
    small = preprocess_label(lab, info)
    assert small.shape == tuple(image.shape)
    onehot = torch.nn.functional.one_hot(torch.from_numpy(small).long(), 5).permute(3, 0, 1, 2).float()
    back = probs_to_input_grid(onehot, info)
    assert back.shape == lab.shape
    for organ in (1, 2, 3, 4):
        inter = ((back == organ) & (lab == organ)).sum()
        assert 2 * inter / ((back == organ).sum() + (lab == organ).sum()) > 0.8


def test_load_case_checks_pairs(tmp_path):
    hu, lab, aff = make_phantom(2, spacing=(6.0, 6.0, 6.0))
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    save_nifti(tmp_path / "imagesTr" / "a_0000.nii.gz", hu, aff)
    save_nifti(tmp_path / "labelsTr" / "a.nii.gz", lab[:-1], aff)
    case = find_cases(tmp_path)[0]
    with pytest.raises(UserError, match="label shape .* differs from image shape"):
        load_case(case, Preprocessing(), "identity")
    save_nifti(tmp_path / "labelsTr" / "a.nii.gz", lab, aff)
    v = load_case(case, Preprocessing(spacing=(6.0, 6.0, 6.0)), "identity")
    assert v.image.shape == v.label.shape  # cropped to the body: no larger than the scan
    assert all(a <= b for a, b in zip(v.image.shape, hu.shape))
    nib.save(nib.Nifti1Image(np.zeros((4, 4), np.int16), np.eye(4)), tmp_path / "imagesTr" / "b_0000.nii.gz")
    save_nifti(tmp_path / "labelsTr" / "b.nii.gz", np.zeros((4, 4, 1), np.uint8), np.eye(4))
    with pytest.raises(UserError, match="2D"):
        load_case(find_cases(tmp_path)[1], Preprocessing(), "identity")


def test_warp_matches_grid_sample_reference():
    """warp_patch (broadcast grid, direct label indexing) gives what affine_grid + grid_sample give:
    trilinear image with border padding, nearest label with background outside."""
    import torch.nn.functional as F

    rng = np.random.default_rng(0)
    aug = AugmentConfig(rotate_prob=1, scale_prob=1, flip_lr_prob=0.5, flip_si_prob=0.5)
    for trial in range(6):
        crop = tuple(int(n) for n in rng.integers(30, 50, 3))
        out = (24, 16, 32)
        image = torch.randn(1, *crop)
        label = torch.from_numpy(rng.integers(0, 5, crop).astype(np.uint8))
        matrix, mirrored = spatial_matrix(rng, aug)
        if trial == 5:
            matrix = matrix * 2.5  # reaches outside the crop
        theta = np.diag(1.0 / np.array(crop)) @ matrix @ np.diag(np.array(out, dtype=np.float64))
        grid = F.affine_grid(torch.tensor(np.c_[theta[::-1, ::-1], np.zeros(3)], dtype=torch.float32)[None],
                             [1, 1, *out], align_corners=False)
        ref_img = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
        ref_lab = F.grid_sample(label[None, None].float(), grid, mode="nearest", align_corners=False)[0, 0].long()
        if mirrored:
            ref_lab = torch.tensor([0, 1, 3, 2, 4])[ref_lab]
        img, lab = warp_patch(image, label, matrix, mirrored, out)
        assert torch.allclose(img, ref_img, atol=1e-4)
        assert torch.equal(lab.long(), ref_lab)
