"""Ensemble checkpoints: train.py --ensemble packs several runs' weights (float16) into one file, and
infer.py averages their softmax probabilities."""

import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import infer
import train
from dataset import AugmentConfig
from phantom import make_phantom
from utils import CHECKPOINT_FORMAT, LABELS, Preprocessing, UserError, preprocess_image
from vnet import build_vnet


def make_run(folder, seed, base_width=4, spacing=8.0, mean=100.0, std=80.0, fp16_exact=True):
    """A run folder whose last.pt holds a random VNet as train.py writes it (optimiser included).
    fp16_exact: weights rounded to float16 values, so an ensemble holds them exactly."""
    torch.manual_seed(seed)
    model = build_vnet("small", base_width=base_width)
    state = {k: v.half().to(v.dtype) if fp16_exact and v.is_floating_point() else v
             for k, v in model.state_dict().items()}
    folder.mkdir(parents=True)
    torch.save({"format": CHECKPOINT_FORMAT, "model": state, "model_config": model.cfg.to_dict(),
                "preprocessing": Preprocessing(spacing=(spacing,) * 3, mean=mean, std=std).to_dict(),
                "labels": {str(k): v for k, v in LABELS.items()}, "roi_size": [32] * 3,
                "augmentation": AugmentConfig().to_dict(), "train_config": {"seed": seed, "run": folder.name},
                "epoch": 4, "metrics": {"mean": 0.5}, "optimizer": {"state": {}, "param_groups": []}},
               folder / "last.pt")
    return folder


@pytest.fixture(scope="module")
def volume():
    hu, _, affine = make_phantom(3, spacing=(6.0, 6.0, 6.0))
    return hu, affine


def probabilities(checkpoint, volume):
    """The Segmenter's probabilities on the preprocessed grid of its own checkpoint: (C, X', Y', Z')."""
    seg = infer.Segmenter(checkpoint, torch.device("cpu"))
    return seg.probabilities(preprocess_image(*volume, seg.prep)[0])


def test_ensemble_of_identical_members_is_the_model(tmp_path, volume):
    run = make_run(tmp_path / "a", 0, fp16_exact=False)
    out = train.build_ensemble([str(run), str(run / "last.pt")], str(tmp_path / "ens.pt"))
    assert out["members"][0] == {"checkpoint": str(run / "last.pt"), "run": "a", "seed": 0, "epoch": 5}
    torch.testing.assert_close(probabilities(tmp_path / "ens.pt", volume), probabilities(run / "last.pt", volume),
                               atol=2e-3, rtol=0)


def test_ensemble_averages_its_members_softmax(tmp_path, volume):
    # The second member learnt other intensity statistics: it must see the CT normalised its own way.
    a, b = make_run(tmp_path / "a", 0), make_run(tmp_path / "b", 1, mean=60.0, std=50.0)
    train.build_ensemble([str(a), str(b)], str(tmp_path / "ens.pt"))
    mean = (probabilities(a / "last.pt", volume) + probabilities(b / "last.pt", volume)) / 2
    torch.testing.assert_close(probabilities(tmp_path / "ens.pt", volume), mean, atol=1e-5, rtol=0)


def test_ensemble_is_float16_small_and_loads_safely(tmp_path):
    runs = [str(make_run(tmp_path / f"s{i}", i, base_width=8, fp16_exact=False)) for i in range(3)]
    train.main(train.parse_args(["--ensemble", *runs, "--ensemble-out", str(tmp_path / "ens.pt"),
                                 "--model-card", "docs/MODEL_CARD.md"]))
    params = sum(v.numel() for v in build_vnet("small").parameters())
    assert params > 2.5e6  # three models as big as the shipped one
    assert (tmp_path / "ens.pt").stat().st_size <= 20e6
    ckpt = torch.load(tmp_path / "ens.pt", map_location="cpu", weights_only=True)
    assert "model" not in ckpt and "optimizer" not in ckpt and len(ckpt["members"]) == 3
    assert ckpt["model_card"] == "docs/MODEL_CARD.md"
    assert [s["seed"] for s in ckpt["member_sources"]] == [0, 1, 2]
    assert {v.dtype for m in ckpt["members"] for k, v in m.items() if "num_batches" not in k} == {torch.float16}


def test_ensemble_refuses_members_of_another_recipe(tmp_path):
    a = make_run(tmp_path / "a", 0)
    wide = make_run(tmp_path / "wide", 1, base_width=8)
    coarse = make_run(tmp_path / "coarse", 2, spacing=10.0)
    with pytest.raises(UserError, match="wide/last.pt: its model_config differs"):
        train.build_ensemble([str(a), str(wide)], str(tmp_path / "x.pt"))
    with pytest.raises(UserError, match="coarse/last.pt: its grid"):
        train.build_ensemble([str(a), str(coarse)], str(tmp_path / "x.pt"))
    with pytest.raises(UserError, match="at least two"):
        train.build_ensemble([str(a)], str(tmp_path / "x.pt"))
    assert not (tmp_path / "x.pt").exists()
    train.build_ensemble([str(a), str(a)], str(tmp_path / "e.pt"))
    with pytest.raises(UserError, match="itself an ensemble"):
        train.build_ensemble([str(tmp_path / "e.pt"), str(a)], str(tmp_path / "x.pt"))
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--ensemble", str(a), str(wide), "--ensemble-out",
                        str(tmp_path / "x.pt")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "x.pt").exists()


def test_init_from_an_ensemble_fine_tunes_member_0(tiny_dataset, tmp_path, capsys):
    a, b = make_run(tmp_path / "a", 0), make_run(tmp_path / "b", 1)
    train.build_ensemble([str(a), str(b)], str(tmp_path / "ens.pt"))
    # lr ~0: the fine-tuned weights stay member 0's (batch-norm statistics aside).
    train.main(train.parse_args(["--data", str(tiny_dataset), "--spacing", "8", "--patch", "16", "--batch-size", "2",
                                 "--steps-per-epoch", "2", "--workers", "0", "--device", "cpu", "--epochs", "1",
                                 "--lr", "1e-12", "--warmup-epochs", "0", "--init", str(tmp_path / "ens.pt"),
                                 "--out", str(tmp_path / "runs"), "--run", "ft"]))
    assert "fine-tuning its member 0" in capsys.readouterr().out
    ft = torch.load(tmp_path / "runs" / "ft" / "last.pt", weights_only=True)
    member = torch.load(a / "last.pt", weights_only=True)["model"]
    for key, value in member.items():
        if "running" not in key and "num_batches" not in key:
            torch.testing.assert_close(ft["model"][key], value, atol=1e-6, rtol=0)
