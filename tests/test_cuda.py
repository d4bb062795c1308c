"""The CUDA paths of train.py and infer.py. On a CPU, their logic is exercised by patching what only a
GPU answers (the bf16 capability query, the current device, an out-of-memory error); the tests marked
`cuda` run on a GPU only (skipped elsewhere; bench/gpu_check.sh runs them)."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

import distributed
import infer
import train
from dataset import Volume
from utils import Preprocessing, WindowFallback, mixed_precision_dtype
from vnet import build_vnet

FAST = ["--spacing", "8", "--patch", "16", "--batch-size", "2", "--steps-per-epoch", "2", "--workers", "0",
        "--seed", "3"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


def assert_same_weights(a, b):
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert a.keys() == b.keys() and not different, different[:5]


# ---------------------------------------------------------------------------------------------
# Item 8: bf16 only where the GPU computes it natively


@pytest.mark.parametrize("major,expected", [(7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)],
                         ids=["t4-v100", "a100", "h100"])
def test_bf16_only_where_native(major, expected, monkeypatch):
    """torch's query counts emulation by default and says yes on a T4 or V100 (no bf16 3D convolutions
    in their cuDNN): the choice must ask for native support."""
    def is_bf16_supported(including_emulation=True):
        return major >= 8 or including_emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert mixed_precision_dtype(torch.device("cuda")) == expected
    assert mixed_precision_dtype(torch.device("cpu")) is None


@pytest.mark.parametrize("units", [True, False], ids=["amx", "no-amx"])
def test_cpu_trains_in_bf16_only_with_bf16_units_and_infers_in_float32(units, monkeypatch):
    """A CPU with AMX bf16 units trains in bf16 (about 3x float32 there); other CPUs, whose bf16 is
    emulated, train in float32; inference keeps float32 on any CPU, so masks do not depend on it."""
    import utils

    monkeypatch.setattr(utils, "cpu_has_bf16_units", lambda: units)
    assert mixed_precision_dtype(torch.device("cpu"), training=True) == (torch.bfloat16 if units else None)
    assert mixed_precision_dtype(torch.device("cpu")) is None


def test_bf16_choice_on_a_torch_without_the_emulation_argument(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)  # torch < 2.3: no including_emulation
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert mixed_precision_dtype(torch.device("cuda")) == torch.float16


# ---------------------------------------------------------------------------------------------
# Item 9: a run resumed on another device


def to_channels_last(t):
    return t.contiguous(memory_format=torch.channels_last_3d) if torch.is_tensor(t) and t.dim() == 5 else t


def test_resume_puts_each_moment_in_its_parameters_layout(tiny_dataset, tmp_path):
    """A CUDA run's last.pt holds channels-last weights and Adam moments; resumed on a CPU (contiguous
    weights) it must continue exactly as the same run saved contiguous. Before, the fused update
    walked the two layouts as one flat array and put the moments on the wrong weights."""
    base = [*FAST, "--deterministic", "--data", str(tiny_dataset), "--device", "cpu", "--out", str(tmp_path)]
    train.main(train.parse_args([*base, "--epochs", "1", "--run", "plain"]))
    shutil.copytree(tmp_path / "plain", tmp_path / "cl")
    ckpt = load(tmp_path / "cl" / "last.pt")
    ckpt["model"] = {k: to_channels_last(v) for k, v in ckpt["model"].items()}
    for moments in ckpt["optimizer"]["state"].values():
        moments.update({k: to_channels_last(v) for k, v in moments.items()})
    assert any(v.dim() == 5 and not v.is_contiguous() for m in ckpt["optimizer"]["state"].values() for v in m.values()
               if torch.is_tensor(v))
    torch.save(ckpt, tmp_path / "cl" / "last.pt")
    for run in ("plain", "cl"):
        train.main(train.parse_args(["--resume", str(tmp_path / run), "--epochs", "2"]))
    assert_same_weights(load(tmp_path / "plain" / "last.pt")["model"], load(tmp_path / "cl" / "last.pt")["model"])


def test_load_optimizer_state_matches_layouts():
    model = build_vnet("small", base_width=4).to(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 1, 16, 16, 16)).mean().backward()
    opt.step()
    fresh = build_vnet("small", base_width=4)  # contiguous, as on a CPU
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    train.load_optimizer_state(opt2, opt.state_dict())
    for p in fresh.parameters():
        for v in opt2.state[p].values():
            if v.shape == p.shape:
                assert v.stride() == p.stride()


# ---------------------------------------------------------------------------------------------
# Item 10: the preprocessing cache of a first multi-process run

RANK_SCRIPT = """
import sys, time
from datetime import timedelta
sys.path.insert(0, sys.argv[1])
import distributed, train
from dataset import cache_status

distributed.TIMEOUT = timedelta(seconds=float(sys.argv[2]))  # the collectives' watchdog, short
real = train.prepare_volumes

def slow(cases, maps, prep, cache, *args, **kwargs):  # seconds per entry to build
    if cache is not None:
        time.sleep(float(sys.argv[3]) * cache_status(cases, maps, prep, cache).count(False))
    return real(cases, maps, prep, cache, *args, **kwargs)

class Loaded(Exception):
    pass

def stop(volumes, *args, **kwargs):
    raise Loaded(len(volumes))

train.prepare_volumes, train.PatchDataset = slow, stop
try:
    train.main(train.parse_args(sys.argv[4:]))
except Loaded as e:
    with open(f"rank{distributed.env_rank()}.txt", "w") as f:
        f.write(f"{e.args[0]} training volumes")
finally:
    distributed.teardown()
"""


def test_two_ranks_build_the_cache_side_by_side(tiny_dataset, tmp_path):
    """Six cases at 2.5 s each against a 10 s watchdog: rank 0 alone (15 s) outlasted it while rank 1
    waited in a collective; each rank building its three, then waiting on the long gloo group, does not."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(ROOT),
           "10", "2.5", *FAST, "--data", str(tiny_dataset), "--device", "cpu", "--cache", str(tmp_path / "cache"),
           "--out", str(tmp_path / "runs"), "--run-name", "r"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    loaded = sorted(p.name for p in tmp_path.glob("rank*.txt"))  # each rank got past the cache: its note
    assert loaded == ["rank0.txt", "rank1.txt"], r.stdout[-3000:] + r.stderr[-3000:]
    assert len(list((tmp_path / "cache").iterdir())) >= 6


# ---------------------------------------------------------------------------------------------
# Item 12: validation out of GPU memory


class RunsOutOfMemory(torch.nn.Module):
    """model, whose first `failures` calls raise CUDA's out-of-memory error."""

    def __init__(self, model, failures):
        super().__init__()
        self.model, self.failures, self.batches = model, failures, []

    def forward(self, x):
        if self.failures:
            self.failures -= 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
        self.batches.append(x.shape[0])
        return self.model(x)


def validation_volume():
    rng = np.random.default_rng(0)
    label = np.zeros((80, 40, 40), np.uint8)
    label[10:40, 5:30, 5:30], label[50:70, 10:20, 10:20] = 1, 4
    image = (rng.normal(0, 20, label.shape) + 100 * label).astype(np.float32)
    return Volume("v", image, label)


def test_validation_falls_back_when_out_of_memory(capsys):
    """Three failures: 4 windows per call, then 2, then 1, then the sums kept on the CPU; the scores
    are those of a validation that never ran out."""
    torch.manual_seed(0)
    model = build_vnet("small", base_width=4)
    prep, cfg, cpu = Preprocessing(mean=60.0, std=50.0), train.TrainConfig(patch=16), torch.device("cpu")
    plain = train.validate(model, [validation_volume()], prep, cfg, cpu, None)
    flaky, windows = RunsOutOfMemory(model, 3), WindowFallback(4, cpu)
    assert train.validate(flaky, [validation_volume()], prep, cfg, cpu, None, windows) == plain
    assert windows.sw_batch == 1 and windows.stitch_on_cpu and set(flaky.batches) == {1}
    assert capsys.readouterr().err.count("warning: out of memory") == 3


def test_a_failed_validation_loses_no_training(tiny_dataset, tmp_path, monkeypatch):
    """last.pt is saved before validating: a validation that dies (out of memory, killed) is run again
    by --resume, which then ends where an uninterrupted run does."""
    base = [*FAST, "--deterministic", "--data", str(tiny_dataset), "--device", "cpu", "--out", str(tmp_path),
            "--epochs", "2"]
    train.main(train.parse_args([*base, "--run", "ref"]))
    real, calls = train.validate, []

    def dies_at_epoch_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "validate", dies_at_epoch_2)
    with pytest.raises(torch.OutOfMemoryError):
        train.main(train.parse_args([*base, "--run", "k"]))
    last = load(tmp_path / "k" / "last.pt")
    assert last["epoch"] == 1 and last["unvalidated"]["epoch"] == 2 and len(last["history"]) == 1
    monkeypatch.setattr(train, "validate", real)
    summary = train.main(train.parse_args(["--resume", str(tmp_path / "k")]))
    assert summary["epochs_run"] == 2
    ours, ref = load(tmp_path / "k" / "last.pt"), load(tmp_path / "ref" / "last.pt")
    assert_same_weights(ours["model"], ref["model"])
    assert without_seconds(ours["history"]) == without_seconds(ref["history"]) and "unvalidated" not in ours


# ---------------------------------------------------------------------------------------------
# Item 14: cuDNN's autotuner, and --device cuda:N


def test_validation_runs_without_cudnn_autotuning(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = build_vnet("small", base_width=4)

        def forward(self, x):
            seen.append(torch.backends.cudnn.benchmark)
            return self.model(x)

    train.validate(Spy(), [validation_volume()], Preprocessing(mean=60.0, std=50.0), train.TrainConfig(patch=16),
                   torch.device("cpu"), None)
    assert seen and not any(seen) and torch.backends.cudnn.benchmark


@pytest.mark.parametrize("folder", [False, True])
def test_folder_inference_runs_without_cudnn_autotuning(folder, tmp_path, monkeypatch):
    import nibabel as nib

    src = tmp_path / "in"
    src.mkdir()
    for name in ("a", "b")[:1 + folder]:
        nib.save(nib.Nifti1Image(np.full((8, 8, 8), -1000, np.int16), np.eye(4)), src / f"{name}.nii.gz")
    seen = []

    class Stop(Exception):
        pass

    def segmenter(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(infer, "configure_torch", lambda device, autotune=True: seen.append(autotune))
    monkeypatch.setattr(infer, "Segmenter", segmenter)
    source = str(src) if folder else str(src / "a.nii.gz")
    output = tmp_path / ("out" if folder else "a_seg.nii.gz")
    with pytest.raises(Stop):
        infer.main(infer.parse_args(["--input", source, "--output", str(output), "--device", "cpu", "--quiet"]))
    assert seen == [not folder]


def test_cuda_index_becomes_the_current_device(monkeypatch):
    """Without torchrun, --device cuda:1 must make GPU 1 the current device: pinned memory, the bf16
    query and synchronize() otherwise use GPU 0."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert distributed.setup("cuda:1").device == torch.device("cuda", 1)
    assert current == [torch.device("cuda", 1)]


# ---------------------------------------------------------------------------------------------
# On a GPU (bench/gpu_check.sh runs these)


@pytest.mark.cuda
def test_train_step_in_mixed_precision_on_cuda():
    device = torch.device("cuda")
    dtype = mixed_precision_dtype(device)
    torch.manual_seed(0)
    model = train.to_training_layout(build_vnet("small"), device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    image = torch.randn(2, 1, 32, 32, 32, device=device).contiguous(memory_format=torch.channels_last_3d)
    label = torch.randint(0, 5, (2, 32, 32, 32), dtype=torch.uint8, device=device).long()
    with torch.autocast("cuda", dtype=dtype):
        logits = model(image)
    assert logits.dtype == dtype
    loss = train.DiceCELoss()(logits.float(), label)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert torch.isfinite(loss) and all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.cuda
def test_inference_on_cuda_matches_cpu(tmp_path):
    from test_infer import make_checkpoint

    from phantom import make_phantom

    ckpt = make_checkpoint(tmp_path / "tiny.pt")
    hu, _, affine = make_phantom(3, spacing=(4.0, 4.0, 4.0))
    labels = {}
    for device, amp in (("cpu", False), ("cuda", False), ("cuda", True)):
        seg = infer.Segmenter(ckpt, torch.device(device), amp=amp)
        labels[device, amp] = seg.segment(hu, affine, postprocess=False)
    assert (labels["cuda", False] == labels["cpu", False]).mean() > 0.999
    assert (labels["cuda", True] == labels["cpu", False]).mean() > 0.99


@pytest.mark.cuda
def test_cpu_run_resumes_on_cuda_in_fp16(tiny_dataset, tmp_path, monkeypatch):
    """A run started on the CPU continues on the GPU; the capability query answers as a T4 or V100's
    would, so the float16 + GradScaler branch runs (a scaler the CPU run never had)."""
    base = [*FAST, "--data", str(tiny_dataset), "--out", str(tmp_path)]
    train.main(train.parse_args([*base, "--device", "cpu", "--epochs", "1", "--run", "r"]))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    summary = train.main(train.parse_args(["--resume", str(tmp_path / "r"), "--epochs", "2", "--device", "cuda"]))
    last = load(tmp_path / "r" / "last.pt")
    assert summary["epochs_run"] == 2 and last["scaler"] and np.isfinite(last["history"][-1]["train_loss"])
