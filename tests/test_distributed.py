"""Multi-process training and inference under torchrun on the CPU (gloo): two ranks train one
model, write one set of outputs and resume together; inference splits a folder between ranks."""

import os
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT

from phantom import make_phantom
from train import DUMP_WEIGHTS_ENV, EpochPatches, EpochSampler

# Patch 16 puts one voxel at the deepest stage: batch norm needs a batch of two there.
FAST = ["--spacing", "8", "--patch", "16", "--batch-size", "2", "--steps-per-epoch", "2", "--workers", "0",
        "--device", "cpu"]


def torchrun(script, args, cwd, env=None, nproc=2):
    # python -m torch.distributed.run: the torchrun executable need not be on PATH.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def load_weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def two_rank_run(tiny_dataset, tmp_path_factory):
    """A two-epoch run by two ranks: (completed process, out folder, folder of each rank's final weights)."""
    out = tmp_path_factory.mktemp("ddp")
    dump = out / "dump"
    dump.mkdir()
    # --run-name: torchrun would take --run as an abbreviation of its own --run-path.
    r = torchrun("train.py", [*FAST, "--data", str(tiny_dataset), "--epochs", "2", "--out", str(out / "runs"),
                              "--run-name", "r"], out, {DUMP_WEIGHTS_ENV: str(dump)})
    return r, out, dump


def test_two_ranks_train_one_model_and_write_once(two_rank_run):
    r, out, dump = two_rank_run
    assert r.returncode == 0, r.stderr[-3000:]
    assert [p.name for p in (out / "runs").iterdir()] == ["r"]  # one run folder: rank 1 made none
    run = out / "runs" / "r"
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "curves.png", "last.pt", "metrics.csv", "metrics.json"]
    # Gradients are averaged and BatchNorm statistics merged: both ranks end with the same weights,
    # the ones last.pt holds.
    rank0, rank1 = load_weights(dump / "rank0.pt"), load_weights(dump / "rank1.pt")
    assert_same_weights(rank0, rank1)
    last = load_weights(run / "last.pt")
    assert_same_weights(rank0, last["model"])
    assert last["epoch"] == 1 and [h["epoch"] for h in last["history"]] == [1, 2]
    assert len((run / "metrics.csv").read_text().splitlines()) == 3
    # Only rank 0 reports.
    assert r.stdout.count("Best validation Dice") == 1
    assert r.stdout.count("epoch   2  loss") == 1
    assert "2 processes" in r.stdout


def test_two_ranks_resume_together(two_rank_run, tmp_path):
    r, out, _ = two_rank_run
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "r"
    shutil.copytree(out / "runs" / "r", run)
    dump = tmp_path / "dump"
    dump.mkdir()
    r = torchrun("train.py", ["--resume", str(run), "--epochs", "3"], tmp_path, {DUMP_WEIGHTS_ENV: str(dump)})
    assert r.returncode == 0, r.stderr[-3000:]
    last = load_weights(run / "last.pt")
    assert last["epoch"] == 2 and [h["epoch"] for h in last["history"]] == [1, 2, 3]
    assert_same_weights(load_weights(dump / "rank0.pt"), load_weights(dump / "rank1.pt"))
    assert_same_weights(load_weights(dump / "rank1.pt"), last["model"])


def test_ranks_draw_disjoint_patches_and_epochs_reach_persistent_workers():
    n, world = 10, 3
    for epoch in (0, 4):
        shares = []
        for rank in range(world):
            sampler = EpochSampler(n, rank, world)
            sampler.set_epoch(epoch)
            shares.append(list(sampler))
            assert len(sampler) == len(shares[-1])
        flat = sorted(i for share in shares for i in share)
        assert flat == list(range(epoch * n, (epoch + 1) * n))  # disjoint, and together the whole epoch
    single = EpochSampler(n)
    assert list(single) == list(range(n))  # one process draws what it always drew

    class Items:
        epoch = 0

        def set_epoch(self, epoch):
            self.epoch = epoch

        def __len__(self):
            return 4

        def __getitem__(self, i):
            return torch.tensor([self.epoch, i])

    sampler = EpochSampler(4)
    loader = torch.utils.data.DataLoader(EpochPatches(Items()), batch_size=4, sampler=sampler, num_workers=1,
                                         persistent_workers=True)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        (batch,) = list(loader)
        assert batch[:, 0].tolist() == [epoch] * 4 and batch[:, 1].tolist() == [0, 1, 2, 3]


def test_inference_splits_a_folder_between_ranks(tmp_path):
    from test_infer import make_checkpoint

    ckpt = make_checkpoint(tmp_path / "tiny.pt")
    src, refs, out = tmp_path / "in", tmp_path / "refs", tmp_path / "out"
    src.mkdir()
    refs.mkdir()
    for seed in (1, 2, 3):
        hu, label, affine = make_phantom(seed, spacing=(8.0, 8.0, 8.0))
        nib.save(nib.Nifti1Image(hu, affine), src / f"case{seed}_0000.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), refs / f"case{seed}.nii.gz")
    # Sorted last: rank 1's second case (rank r takes cases r, r + 2, ...), so a failure must travel to rank 0.
    (src / "zbroken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    args = ["--input", str(src), "--output", str(out), "--checkpoint", str(ckpt), "--label", str(refs), "--no-png",
            "--device", "cpu"]
    r = torchrun("infer.py", args, tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"case{i}{suffix}" for i in (1, 2, 3) for suffix in (".nii.gz", "_statistics.json")]
        + ["metrics.csv", "metrics.json", "statistics.csv"])
    assert [row.split(",")[0] for row in (out / "statistics.csv").read_text().splitlines()[1:]] == [
        "case1", "case2", "case3"]
    rows = (out / "metrics.csv").read_text().splitlines()
    assert sorted({row.split(",")[0] for row in rows[1:]}) == ["case1", "case2", "case3", "mean"]
    assert r.stdout.count("3 of 4 scans segmented") == 1  # rank 0's summary, once
    assert "1 of 4 scans failed" in r.stderr and "zbroken" in r.stderr
    seg = nib.load(out / "case2.nii.gz")
    assert np.asarray(seg.dataobj).dtype == np.uint8
