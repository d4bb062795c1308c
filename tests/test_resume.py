"""Crash safety of train.py: a run killed by SIGKILL mid-epoch or mid-save continues with --resume
from its last complete checkpoint and, with --deterministic, ends with exactly the weights, optimiser
state, weight average (--ema) and history of an uninterrupted run with the same seed."""

import signal
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

ARGS = ["--spacing", "8", "--patch", "16", "--batch-size", "2", "--steps-per-epoch", "3", "--epochs", "3",
        "--workers", "0", "--device", "cpu", "--deterministic", "--label-map", "identity", "--seed", "5", "--ema", "0.9"]

# train.py's CLI in a child process that SIGKILLs itself at a chosen moment: after optimiser step N
# ("step N"), or while saving the Nth copy of last.pt or best.pt ("last.pt N", "best.pt N"): once the
# temporary file is written, before the rename that would publish it.
KILLER = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import torch
what, n = sys.argv[2], int(sys.argv[3])
count = [0]

def hit():
    count[0] += 1
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)

if what == "step":
    step = torch.optim.AdamW.step
    def counted_step(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        hit()
        return out
    torch.optim.AdamW.step = counted_step
else:
    save = torch.save
    def counted_save(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        if os.path.basename(str(f)).startswith("." + what.removesuffix(".pt") + "."):
            hit()
    torch.save = counted_save

import train
from utils import run_cli
run_cli(train.main, train.parse_args(sys.argv[4:]))
"""


def train_cli(args, killer=None):
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    if killer:
        cmd = [sys.executable, "-c", KILLER, str(ROOT), *killer, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_tensors(a, b, where):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def without_seconds(history):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in history]


@pytest.fixture(scope="module")
def reference(tiny_dataset, tmp_path_factory):
    """An uninterrupted deterministic run: its run folder."""
    out = tmp_path_factory.mktemp("ref")
    r = train_cli([*ARGS, "--data", str(tiny_dataset), "--out", str(out), "--run", "ref"])
    assert r.returncode == 0, r.stderr
    return out / "ref"


def test_killed_run_resumes_to_the_same_weights(reference, tiny_dataset, tmp_path):
    """One run killed three times, each kill a different moment, then resumed to its end."""
    run = tmp_path / "k"

    # 1. Killed saving the first best.pt (epoch 1 of 3): last.pt of epoch 1 is out, best.pt is not.
    r = train_cli([*ARGS, "--data", str(tiny_dataset), "--out", str(tmp_path), "--run", "k"], killer=["best.pt", "1"])
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert load(run / "last.pt")["epoch"] == 0
    assert not (run / "best.pt").exists() and len(list(run.glob(".best.*.tmp*"))) == 1

    # 2. Resumed (best.pt is written from last.pt, the temporary file removed), then killed saving
    # last.pt of epoch 2: the previous last.pt stays whole.
    r = train_cli(["--resume", str(run)], killer=["last.pt", "1"])
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert "resuming" in r.stdout
    assert load(run / "last.pt")["epoch"] == 0 and load(run / "best.pt")["epoch"] == 0
    assert [p.name.split(".")[1] for p in run.glob(".*.tmp*")] == ["last"]

    # 3. Resumed, then killed after optimiser step 4 of this process: mid-epoch 3 of 3.
    r = train_cli(["--resume", str(run)], killer=["step", "4"])
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert load(run / "last.pt")["epoch"] == 1
    assert not list(run.glob(".*.tmp*"))

    # 4. Resumed to the end: everything equals the uninterrupted run's, bit for bit.
    r = train_cli(["--resume", str(run)])
    assert r.returncode == 0, r.stderr
    assert "Best validation Dice" in r.stdout
    for name in ("last.pt", "best.pt"):
        ours, ref = load(run / name), load(reference / name)
        assert ours["epoch"] == ref["epoch"] and ours["best_epoch"] == ref["best_epoch"], name
        assert_same_tensors(ours["model"], ref["model"], f"{name} model")
        assert without_seconds(ours["history"]) == without_seconds(ref["history"]), name
    for key in ("optimizer", "train_weights", "ema_updates"):  # --ema: the average and the weights it follows
        assert_same_tensors(load(run / "last.pt")[key], load(reference / "last.pt")[key], key)
    assert (run / "metrics.csv").read_text().count("\n") == 4  # header + 3 epochs
    assert (run / "metrics.json").exists() and (run / "curves.png").exists()
    assert not list(run.glob(".*.tmp*"))


def test_resume_refuses_a_checkpoint_without_optimizer_state(reference, capsys):
    import train
    from utils import run_cli

    with pytest.raises(SystemExit) as e:
        run_cli(train.main, train.parse_args(["--resume", str(reference / "best.pt")]))
    err = capsys.readouterr().err
    assert e.value.code == 1 and err.count("\n") == 1 and err.startswith("error: ") and "last.pt" in err, err


def test_new_run_into_an_existing_run_folder_is_refused(reference, tiny_dataset):
    import train
    from utils import UserError

    with pytest.raises(UserError, match="the run folder exists; continue it with --resume"):
        train.main(train.parse_args([*ARGS, "--data", str(tiny_dataset), "--out", str(reference.parent),
                                     "--run", reference.name]))
