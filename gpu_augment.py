"""Patch augmentation for a whole batch on the training device (train.py --gpu-augment).

At 128^3 on a GPU the loader's per-patch work, dataset.warp_patch (an affine_grid and a
grid_sample over the patch on a CPU core) and the intensity augmentation, can take longer than a
training step. With PatchDataset(defer=True) a loader item is only the un-warped crop (HU) with
the spatial matrix and the random generator it drew; collate_crops places a batch's crops of
different sizes in one buffer, and augment_batch warps, normalises and intensity-augments the
batch on the device: the per-patch math, one grid_sample for the batch
(tests/test_gpu_augment.py compares the two on a CPU).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dataset import AugmentConfig, augment_intensity
from utils import LR_SWAP, Preprocessing


def crop_theta(matrix: np.ndarray, crop: tuple[int, ...], out_size: tuple[int, ...], buffer: tuple[int, ...],
               offset: tuple[int, ...]) -> torch.Tensor:
    """affine_grid's (3, 4) float32 theta for dataset.warp_patch's map (output voxel o from crop
    position (crop - 1) / 2 + matrix @ (o - (out - 1) / 2)) when the crop lies at offset in a
    larger buffer. affine_grid works in the buffer's normalised (-1..1, align_corners=False)
    coordinates, axes reversed (W, H, D): u = (2 j + 1) / buffer - 1 for voxel index j."""
    crop_a, out_a, buf_a = (np.asarray(v, dtype=np.float64) for v in (crop, out_size, buffer))
    linear = np.diag(1.0 / buf_a) @ np.asarray(matrix, dtype=np.float64) @ np.diag(out_a)
    shift = (crop_a + 2 * np.asarray(offset, dtype=np.float64) - buf_a) / buf_a
    theta = np.concatenate([linear[::-1, ::-1], shift[::-1, None]], axis=1)
    return torch.from_numpy(np.ascontiguousarray(theta, dtype=np.float32))


def collate_crops(items: list[dict]) -> dict:
    """DataLoader collate for PatchDataset(defer=True) items (image (1, *crop) float HU, label
    (*crop) uint8, matrix, mirrored, rng, out_size): the crops centred in one zero-filled buffer,
    image (N, 1, *S) and label (N, *S) with S the largest crop side per axis, and the thetas
    (N, 3, 4) that sample each crop as warp_patch samples it alone. The warp reads only inside
    each crop (PatchDataset sizes crops so), never the filling."""
    crops = np.array([tuple(it["label"].shape) for it in items])
    size = tuple(int(v) for v in crops.max(0))
    image = torch.zeros((len(items), 1, *size), dtype=torch.float32)
    label = torch.zeros((len(items), *size), dtype=torch.uint8)
    thetas = []
    for n, (it, crop) in enumerate(zip(items, crops)):
        offset = (np.array(size) - crop) // 2
        box = tuple(slice(int(o), int(o + c)) for o, c in zip(offset, crop))
        image[(n, 0, *box)] = it["image"][0]
        label[(n, *box)] = it["label"]
        thetas.append(crop_theta(it["matrix"], tuple(crop), it["out_size"], size, tuple(offset)))
    return {"image": image, "label": label, "theta": torch.stack(thetas), "out_size": tuple(items[0]["out_size"]),
            "mirrored": torch.tensor([bool(it["mirrored"]) for it in items]), "rng": [it["rng"] for it in items]}


def augment_batch(batch: dict, prep: Preprocessing, aug: AugmentConfig, device: torch.device
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """collate_crops's batch -> image (N, 1, *patch) float32 normalised and augmented, label
    (N, *patch) int64, on device: trilinear image and nearest label warp, the kidney labels
    swapped where the patch was mirrored left-right, then dataset.augment_intensity per patch
    with the generator its item drew from (the same numbers as the loader path on a CPU)."""
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    theta = batch["theta"].to(device, non_blocking=True)
    grid = F.affine_grid(theta, [len(theta), 1, *batch["out_size"]], align_corners=False)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    image.sub_(prep.mean).div_(prep.std)
    label = F.grid_sample(label[:, None].float(), grid, mode="nearest", padding_mode="zeros",
                          align_corners=False)[:, 0].long()
    swapped = torch.from_numpy(LR_SWAP).to(device).long()[label]
    label = torch.where(batch["mirrored"].to(device)[:, None, None, None], swapped, label)
    for n, rng in enumerate(batch["rng"]):
        augment_intensity(image[n], rng, aug)  # in place, on the batch's own storage
    return image, label
