import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

import train

# Batch 2: at patch 16 the VNet's deepest stage is one voxel, and batch norm needs two values.
FAST = ["--spacing", "8", "--patch", "16", "--batch-size", "2", "--steps-per-epoch", "2", "--workers", "0",
        "--device", "cpu"]


def run_train(args, tmp_path):
    return train.main(train.parse_args([*FAST, "--out", str(tmp_path / "runs"), *args]))


def test_two_epochs_write_loadable_checkpoints(tiny_dataset, tmp_path):
    summary = run_train(["--data", str(tiny_dataset), "--epochs", "2", "--run", "r"], tmp_path)
    run = tmp_path / "runs" / "r"
    for name in ("best.pt", "last.pt", "metrics.csv", "metrics.json", "curves.png"):
        assert (run / name).exists(), name
    last = torch.load(run / "last.pt", weights_only=True)
    best = torch.load(run / "best.pt", weights_only=True)
    assert last["epoch"] == 1 and len(last["history"]) == 2
    for key in ("model", "model_config", "preprocessing", "labels", "metrics", "train_config"):
        assert key in best
    assert best["labels"]["2"] == "right_kidney"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"liver", "right_kidney", "left_kidney", "spleen", "mean"} <= set(metrics)
    assert summary["mean"] == metrics["mean"]
    # Validation Dice is measured on the training grid, and every place that stores it says so.
    assert metrics["grid"] == "training" and metrics["grid_spacing_mm"] == 8.0
    assert best["metrics_grid"] == "8 mm training grid"
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "liver_dice_training_grid" in header and "mean_dice_training_grid" in header and "liver" not in header


def test_early_stopping_fires(tiny_dataset, tmp_path):
    # lr ~0: the weights stay put (only batch-norm statistics drift), so patience 1 stops well before epoch 6.
    summary = run_train(["--data", str(tiny_dataset), "--epochs", "6", "--patience", "1", "--lr", "1e-12",
                         "--warmup-epochs", "0", "--run", "es"], tmp_path)
    assert summary["stopped"].startswith("early stop") and summary["epochs_run"] < 6


def test_time_budget_ends_the_schedule(tiny_dataset, tmp_path):
    # A budget already spent after the first epoch: the schedule is re-fitted to that one epoch, and
    # the run ends there with a best checkpoint.
    summary = run_train(["--data", str(tiny_dataset), "--epochs", "5", "--max-minutes", "0.0001", "--run", "tb"],
                        tmp_path)
    assert summary["stopped"].startswith("time budget") and summary["epochs_run"] == 1
    assert (tmp_path / "runs" / "tb" / "best.pt").is_file()


def test_resume_continues_from_saved_epoch(tiny_dataset, tmp_path):
    run_train(["--data", str(tiny_dataset), "--epochs", "1", "--run", "res"], tmp_path)
    run = tmp_path / "runs" / "res"
    summary = train.main(train.parse_args(["--resume", str(run), "--epochs", "3"]))
    last = torch.load(run / "last.pt", weights_only=True)
    assert last["epoch"] == 2 and [h["epoch"] for h in last["history"]] == [1, 2, 3]
    assert summary["epochs_run"] == 3


def test_init_fine_tunes_from_a_checkpoint(tiny_dataset, tmp_path):
    run_train(["--data", str(tiny_dataset), "--epochs", "1", "--run", "base"], tmp_path)
    base_path = tmp_path / "runs" / "base" / "best.pt"
    base = torch.load(base_path, weights_only=True)
    # lr ~0: the fine-tuned weights must still be the checkpoint's (batch-norm statistics aside).
    run_train(["--data", str(tiny_dataset), "--epochs", "1", "--lr", "1e-12", "--warmup-epochs", "0",
               "--init", str(base_path), "--run", "ft"], tmp_path)
    ft = torch.load(tmp_path / "runs" / "ft" / "last.pt", weights_only=True)
    for key, value in base["model"].items():
        if "running" not in key and "num_batches" not in key:
            assert torch.allclose(ft["model"][key], value, atol=1e-6), key
    assert ft["preprocessing"] == base["preprocessing"] and ft["train_config"]["init"] == str(base_path)
    assert ft["train_config"]["preset"] == "small"
    summary = train.main(train.parse_args(["--resume", str(tmp_path / "runs" / "ft"), "--epochs", "2"]))
    assert summary["epochs_run"] == 2
    with pytest.raises(train.UserError, match="trained at 8 mm"):
        train.main(train.parse_args(["--data", str(tiny_dataset), "--init", str(base_path), "--spacing", "4",
                                     "--out", str(tmp_path / "runs"), "--run", "bad"]))
    with pytest.raises(train.UserError, match="holds a 'small' VNet"):
        train.main(train.parse_args(["--data", str(tiny_dataset), "--init", str(base_path), "--preset", "vnet",
                                     "--out", str(tmp_path / "runs"), "--run", "bad"]))
    with pytest.raises(train.UserError, match="no such checkpoint"):
        train.main(train.parse_args(["--data", str(tiny_dataset), "--init", str(tmp_path / "nope.pt"),
                                     "--out", str(tmp_path / "runs"), "--run", "bad"]))
    assert not (tmp_path / "runs" / "bad").exists()


def _cli(args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_end_to_end(tiny_dataset, tmp_path):
    r = _cli([*FAST, "--data", str(tiny_dataset), "--epochs", "1", "--out", str(tmp_path)], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Best validation Dice on the 8 mm training grid" in r.stdout and "right_kidney" in r.stdout
    assert "val Dice (8 mm training grid) liver" in r.stdout


@pytest.mark.parametrize("case", ["missing", "empty", "no_labels", "bad_values"])
def test_bad_data_is_one_line_exit_1(case, tmp_path, tiny_dataset):
    import shutil

    data = tmp_path / "d"
    if case == "empty":
        data.mkdir()
    elif case in ("no_labels", "bad_values"):
        shutil.copytree(tiny_dataset, data)
        if case == "no_labels":
            shutil.rmtree(data / "labelsTr")
            (data / "labelsTr").mkdir()
        else:
            import nibabel as nib

            path = data / "labelsTr" / "phantom_002.nii.gz"
            img = nib.load(path)
            arr = img.get_fdata().astype("uint8")
            arr[0, 0, 0] = 9
            nib.save(nib.Nifti1Image(arr, img.affine), path)
    r = _cli(["--data", str(data), "--out", str(tmp_path / "o"), *FAST], tmp_path)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert str(data) in lines[0]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("kind", ["raw", "mri"])
def test_images_not_in_hu_are_refused_when_read(kind, tiny_dataset, tmp_path):
    """A CT stored as 0..4095 without its rescale, or an MRI in a datalist, would be clipped to the HU
    window and skew the intensity statistics: reading the case for training refuses it."""
    import nibabel as nib
    import numpy as np

    images = sorted((tiny_dataset / "imagesTr").glob("*.nii.gz"))
    labels = sorted((tiny_dataset / "labelsTr").glob("*.nii.gz"))
    bad = tmp_path / f"{kind}.nii.gz"
    src = nib.load(images[1])
    hu = np.asanyarray(src.dataobj).astype(np.float32)
    values = np.clip(hu + 1024, 0, 4095) if kind == "raw" else np.clip(hu + 1000, 0, None) * 0.4  # MRI: no negatives
    nib.save(nib.Nifti1Image(values.astype(np.uint16), src.affine), bad)
    entries = [{"image": str(i), "label": str(lab)} for i, lab in zip(images, labels)]
    entries[1]["image"] = str(bad)
    datalist = tmp_path / "list.json"
    datalist.write_text(json.dumps({"training": entries, "label_map": "identity"}))
    with pytest.raises(train.UserError, match=rf"{bad}: no voxel below -500 HU .*not a CT in Hounsfield units.*rescale"):
        run_train(["--data", str(datalist), "--epochs", "1", "--run", kind], tmp_path)


def test_ema_checkpoints_hold_the_weight_average(tiny_dataset, tmp_path):
    run_train(["--data", str(tiny_dataset), "--epochs", "2", "--ema", "0.9", "--run", "ema"], tmp_path)
    last = torch.load(tmp_path / "runs" / "ema" / "last.pt", weights_only=True)
    best = torch.load(tmp_path / "runs" / "ema" / "best.pt", weights_only=True)
    assert last["ema_updates"] == 4 and "train_weights" not in best
    key = next(k for k in last["model"] if k.endswith("weight"))
    assert not torch.equal(last["model"][key], last["train_weights"][key])
    # The average is what inference loads: a checkpoint with it is a plain model checkpoint.
    assert set(last["model"]) == set(last["train_weights"])


def test_ema_decay_out_of_range_is_refused(tiny_dataset, tmp_path):
    with pytest.raises(train.UserError, match="--ema 1"):
        run_train(["--data", str(tiny_dataset), "--epochs", "1", "--ema", "1", "--run", "bad"], tmp_path)


def test_weight_average_is_bias_corrected():
    # Weights 1, 2, 3 at decay 0.5: the exponentially weighted means 1, (0.5 + 2) / 1.5, (0.5 + 2 + 6) / 3.5.
    model = torch.nn.Linear(2, 1)
    average = train.WeightAverage(model, 0.5)
    seen = []
    for value in (1.0, 2.0, 3.0):
        with torch.no_grad():
            model.bias.fill_(value)
        average.update(model)
        seen.append(average.model.bias.item())
    assert seen == pytest.approx([1.0, 2.5 / 1.5, 8.5 / 3.5])


def test_clip_gradients_equals_torch_clip_grad_norm_within_and_beyond_the_bound():
    from train import clip_gradients

    for scale in (1e-3, 1e3):  # total norm far below and far above 12
        torch.manual_seed(0)
        ours, ref = torch.nn.Linear(30, 20), torch.nn.Linear(30, 20)
        ref.load_state_dict(ours.state_dict())
        x = torch.randn(8, 30)
        for layer in (ours, ref):
            (layer(x).square().sum() * scale).backward()
        assert torch.equal(ours.weight.grad, ref.weight.grad)
        total = clip_gradients(list(ours.parameters()), 12.0)
        expected = torch.nn.utils.clip_grad_norm_(ref.parameters(), 12.0)
        assert torch.equal(total, expected)
        for a, b in zip(ours.parameters(), ref.parameters()):
            assert torch.equal(a.grad, b.grad)
