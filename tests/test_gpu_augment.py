"""--gpu-augment's batched warp and intensity augmentation (dataset.collate_crops + augment_batch),
run on the CPU, against PatchDataset's per-patch path: the same patches up to float rounding."""

import numpy as np
import torch

from dataset import AugmentConfig, PatchDataset, Volume, augment_batch, collate_crops
from phantom import make_phantom
from utils import Preprocessing


def _volumes():
    vols = []
    for seed in (1, 2):
        hu, lab, _ = make_phantom(seed, spacing=(6.0, 6.0, 6.0))
        vols.append(Volume(str(seed), hu.astype(np.float32), lab))
    return vols


def test_batched_augmentation_matches_per_patch_path():
    prep = Preprocessing(spacing=(6.0,) * 3)
    prep.mean, prep.std = 40.0, 120.0
    # Every augmentation often, the left-right mirror included (its label swap must follow).
    aug = AugmentConfig(rotate_prob=0.7, scale_prob=0.7, flip_lr_prob=0.5, gamma_prob=0.5, noise_prob=0.5)
    vols = _volumes()
    per_patch = PatchDataset(vols, prep, (24, 24, 24), 32, aug, seed=5)
    deferred = PatchDataset(vols, prep, (24, 24, 24), 32, aug, seed=5, defer=True)
    seen = {"rotated": 0, "mirrored": 0, "sizes": set()}
    for start in range(0, 32, 4):
        items = [deferred[i] for i in range(start, start + 4)]
        for it in items:
            m = it["matrix"]
            seen["rotated"] += not np.allclose(np.abs(m), np.diag(np.abs(np.diag(m))))
            seen["mirrored"] += bool(it["mirrored"])
            seen["sizes"].add(tuple(it["label"].shape))
        image, label = augment_batch(collate_crops(items), prep, aug, torch.device("cpu"))
        assert image.shape == (4, 1, 24, 24, 24) and image.dtype == torch.float32
        assert label.shape == (4, 24, 24, 24) and label.dtype == torch.int64
        for k, i in enumerate(range(start, start + 4)):
            ref_image, ref_label = per_patch[i]
            torch.testing.assert_close(image[k], ref_image, atol=2e-3, rtol=1e-4)
            # Nearest-neighbour labels may flip only where a sample point sits on a voxel boundary.
            assert (label[k] != ref_label).float().mean() < 1e-3
    assert min(seen["rotated"], seen["mirrored"]) > 0
    assert len(seen["sizes"]) > 4  # crops of many sizes shared one batch buffer


def test_zoom_in_with_patch_sized_crop_is_warped():
    # A zoom-in can make the crop exactly the patch size; the per-patch path must still warp it.
    prep = Preprocessing(spacing=(6.0,) * 3)
    prep.mean, prep.std = 40.0, 120.0
    aug = AugmentConfig(rotate_prob=0.0, scale_prob=1.0, scale=(0.9, 0.9), intensity_prob=0.0, gamma_prob=0.0,
                        noise_prob=0.0)
    vols = _volumes()
    per_patch = PatchDataset(vols, prep, (20, 20, 20), 4, aug, seed=0)
    deferred = PatchDataset(vols, prep, (20, 20, 20), 4, aug, seed=0, defer=True)
    item = deferred[0]
    assert tuple(item["label"].shape) == (20, 20, 20)  # ceil(0.9 * 20) + 2
    image, _ = augment_batch(collate_crops([item]), prep, aug, torch.device("cpu"))
    assert not torch.equal((item["image"] - prep.mean) / prep.std, image[0])
    torch.testing.assert_close(image[0], per_patch[0][0], atol=1e-4, rtol=1e-4)
