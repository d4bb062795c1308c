"""The bad-input matrix of every command line (train.py, infer.py, visualize.py, dataset.py --check):
missing, empty, truncated and misnamed files, 2D and 4D images, NaN/Inf voxels, a constant image, a
volume smaller than one patch, 5 mm slices, extreme HU, an image/label mismatch, unknown labels,
an unwritable output, an existing output, and checkpoints that are damaged, do not fit their config
or carry pickled code.

Bad input: exit code 1, one line "error: ..." naming the file, no traceback, no partial output.
Unusual but valid input (constant image, small volume, 5 mm slices, extreme HU): exit code 0 and
an output on the input's grid (training refuses a constant image: not in HU). A representative
subset runs as subprocesses (the real exit code and stderr), the rest in-process through
utils.run_cli, which is what the scripts' __main__ calls."""

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import ROOT

import infer
import train
import visualize
from phantom import make_phantom
from utils import CHECKPOINT_FORMAT, LABELS, Preprocessing, UserError, run_cli, save_nifti
from vnet import build_vnet

GRID = 6.0  # mm: the tiny checkpoint's grid and the phantoms' spacing, so each run takes a second
TRAIN_FAST = ["--spacing", "8", "--patch", "16", "--batch-size", "2", "--steps-per-epoch", "1", "--epochs", "1",
              "--workers", "0", "--device", "cpu", "--label-map", "identity"]


class PickledCode:
    """Unpickling this calls Path.touch(marker): proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


@pytest.fixture(scope="module")
def f(tmp_path_factory) -> dict[str, Path]:
    """Every input of the matrix, from two 6 mm phantoms. Keys name the problem; *_label files
    are label maps, the rest CTs in HU."""
    d = tmp_path_factory.mktemp("inputs")
    hu, lab, aff = make_phantom(0, spacing=(GRID,) * 3)
    out = {"ct": _save(d / "ct.nii.gz", hu, aff), "label": _save(d / "label.nii.gz", lab, aff)}
    out["missing"] = d / "missing.nii.gz"
    out["empty"] = d / "empty.nii.gz"
    out["empty"].write_bytes(b"")
    raw = out["ct"].read_bytes()
    out["truncated"] = d / "truncated.nii.gz"
    out["truncated"].write_bytes(raw[: len(raw) // 2])
    out["wrong_ext"] = d / "ct.nrrd"
    out["wrong_ext"].write_bytes(raw)
    out["2d"] = _save(d / "slice.nii.gz", hu[:, :, hu.shape[2] // 2], aff)
    out["4d"] = _save(d / "series.nii.gz", np.stack([hu, hu], -1), aff)
    nan = hu.astype(np.float32)
    nan[:2] = np.nan
    nan[-1, 0, 0] = np.inf
    out["nan"] = _save(d / "nan.nii.gz", nan, aff)
    out["constant"] = _save(d / "constant.nii.gz", np.full(hu.shape, 40, np.int16), aff)
    # 8 voxels a side (48 mm) around the liver: half a 96 mm patch.
    centre = np.round(np.argwhere(lab == 1).mean(0)).astype(int)
    box = tuple(slice(c - 4, c + 4) for c in centre)
    shift = np.eye(4)
    shift[:3, 3] = [b.start for b in box]
    small_hu = hu[box].copy()
    small_hu[0, 0, 0] = -1000  # a CT in HU has air somewhere
    out["small"] = _save(d / "small.nii.gz", small_hu, aff @ shift)
    out["small_label"] = _save(d / "small_label.nii.gz", lab[box], aff @ shift)
    thick_hu, thick_lab, thick_aff = make_phantom(1, spacing=(GRID, GRID, 5.0))
    out["thick"] = _save(d / "thick.nii.gz", thick_hu, thick_aff)
    out["thick_label"] = _save(d / "thick_label.nii.gz", thick_lab, thick_aff)
    extreme = hu.copy()
    extreme[:2] = -32768
    extreme[-2:] = 32767
    extreme[20:22, 20:22, 10:12] = 32767  # inside the body too
    out["extreme"] = _save(d / "extreme.nii.gz", extreme, aff)
    out["mismatch_label"] = _save(d / "mismatch_label.nii.gz", lab[:-4], aff)
    unknown = lab.copy()
    unknown[lab == 2] = 9
    out["unknown_label"] = _save(d / "unknown_label.nii.gz", unknown, aff)
    nan_label = lab.astype(np.float32)
    nan_label[0, 0, :] = np.nan
    out["nan_label"] = _save(d / "nan_label.nii.gz", nan_label, aff)
    out["constant_label"] = _save(d / "constant_label.nii.gz", np.ones(lab.shape, np.uint8), aff)
    out["background_label"] = _save(d / "background_label.nii.gz", np.zeros(lab.shape, np.uint8), aff)
    far = aff.copy()
    far[:3, 3] += 500.0  # the same CT half a metre away: not the CT of this label map
    out["far_ct"] = _save(d / "far_ct.nii.gz", hu, far)
    out["a_file"] = d / "a_file"
    out["a_file"].write_text("not a folder")
    return out


def tiny_checkpoint(path: Path, **extra) -> Path:
    """A random tiny VNet in train.py's checkpoint format (6 mm grid, 16^3 patch)."""
    torch.manual_seed(0)
    model = build_vnet("small", base_width=4)
    prep = Preprocessing(spacing=(GRID,) * 3, mean=100.0, std=80.0)
    ckpt = {"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": model.cfg.to_dict(),
            "preprocessing": prep.to_dict(), "labels": {str(k): v for k, v in LABELS.items()},
            "roi_size": [16, 16, 16], "epoch": 0, "metrics": {}}
    ckpt.update(extra)
    torch.save(ckpt, path)
    return path


@pytest.fixture(scope="module")
def ck(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("checkpoints")
    good = tiny_checkpoint(d / "tiny.pt")
    out = {"good": good, "missing": d / "missing.pt", "empty": d / "empty.pt", "truncated": d / "truncated.pt"}
    out["empty"].write_bytes(b"")
    raw = good.read_bytes()
    out["truncated"].write_bytes(raw[: len(raw) // 2])
    wide = build_vnet("small", base_width=8).cfg.to_dict()
    out["config_mismatch"] = tiny_checkpoint(d / "mismatch.pt", model_config=wide)
    out["pickled_code"] = tiny_checkpoint(d / "evil.pt", extra=PickledCode(d / "RAN"))
    out["pickled_code_marker"] = d / "RAN"
    return out


def cli(main, parse_args, argv, capsys) -> tuple[int, str, list[str]]:
    """Runs a script's command line in-process as its __main__ does: (exit code, stdout, stderr lines).
    infer.py's warnings about the masks ("check the masks", tests/test_robustness.py) are left out:
    the random models here paint organs anywhere, and these tests count the warnings about inputs."""
    try:
        run_cli(main, parse_args([str(a) for a in argv]))
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.strip().splitlines() if ": check the masks: " not in line]


def assert_one_error(code, err, *names):
    assert code == 1, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for name in names:
        assert str(name) in err[0], err


def script(name, *argv, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / name), *[str(a) for a in argv]], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def assert_one_error_line(r, *names):
    assert r.returncode == 1, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for name in names:
        assert str(name) in lines[0], r.stderr


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def same_grid(out: Path, source: Path) -> None:
    a, b = nib.load(str(out)), nib.load(str(source))
    assert a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-4)
    assert np.asarray(a.dataobj).dtype == np.uint8


# ---------------------------------------------------------------------------------------------
# infer.py


INFER_BAD = ["missing", "empty", "truncated", "wrong_ext", "2d", "4d"]


@pytest.mark.parametrize("kind", INFER_BAD)
def test_infer_bad_scan(kind, f, ck, tmp_path, capsys):
    out = tmp_path / "seg.nii.gz"
    code, _, err = cli(infer.main, infer.parse_args,
                       ["--input", f[kind], "--output", out, "--checkpoint", ck["good"], "--device", "cpu", "--quiet"],
                       capsys)
    assert_one_error(code, err, f[kind])
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("kind", ["mismatch_label", "unknown_label"])
def test_infer_bad_reference(kind, f, ck, tmp_path, capsys):
    code, _, err = cli(infer.main, infer.parse_args,
                       ["--input", f["ct"], "--output", tmp_path / "seg.nii.gz", "--label", f[kind],
                        "--checkpoint", ck["good"], "--device", "cpu", "--quiet"], capsys)
    assert_one_error(code, err, f[kind])
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "config_mismatch"])
def test_infer_bad_checkpoint(kind, f, ck, tmp_path, capsys):
    code, _, err = cli(infer.main, infer.parse_args,
                       ["--input", f["ct"], "--output", tmp_path / "seg.nii.gz", "--checkpoint", ck[kind],
                        "--device", "cpu", "--quiet"], capsys)
    assert_one_error(code, err, ck[kind])
    assert files_in(tmp_path) == []


def test_infer_unwritable_and_existing_outputs(f, ck, tmp_path, capsys):
    common = ["--checkpoint", ck["good"], "--device", "cpu", "--quiet"]
    under_a_file = f["a_file"] / "seg.nii.gz"  # root ignores chmod; nobody can create a file below a file
    code, _, err = cli(infer.main, infer.parse_args, ["--input", f["ct"], "--output", under_a_file, *common], capsys)
    assert_one_error(code, err, under_a_file, "not a folder")
    code, _, err = cli(infer.main, infer.parse_args, ["--input", f["ct"], "--output", "/proc/seg.nii.gz", *common],
                       capsys)
    assert_one_error(code, err, "/proc/seg.nii.gz", "cannot write in /proc")
    code, _, err = cli(infer.main, infer.parse_args, ["--input", f["2d"].parent, "--output", under_a_file.parent / "x",
                                                      *common], capsys)
    assert_one_error(code, err, f["a_file"])
    existing = tmp_path / "seg.nii.gz"
    existing.write_bytes(b"keep me")
    code, _, err = cli(infer.main, infer.parse_args, ["--input", f["ct"], "--output", existing, *common], capsys)
    assert_one_error(code, err, existing, "--overwrite")
    assert existing.read_bytes() == b"keep me"


@pytest.mark.parametrize("kind", ["constant", "small", "thick", "extreme", "nan"])
def test_infer_unusual_but_valid_scan(kind, f, ck, tmp_path, capsys):
    out = tmp_path / "seg.nii.gz"
    code, _, err = cli(infer.main, infer.parse_args, ["--input", f[kind], "--output", out, "--checkpoint", ck["good"],
                                                      "--device", "cpu", "--quiet", "--no-png"], capsys)
    assert code == 0, err
    same_grid(out, f[kind])
    # A constant image is not HU-like and a NaN voxel is damage: one warning line each, nothing else.
    assert len(err) == (1 if kind in ("constant", "nan") else 0), err
    assert all(line.startswith("warning: ") and str(f[kind]) in line for line in err)
    assert files_in(tmp_path) == ["seg.nii.gz", "seg_statistics.json"]


def test_infer_refuses_pickled_code_without_running_it(f, ck, tmp_path):
    r = script("infer.py", "--input", f["ct"], "--output", tmp_path / "seg.nii.gz", "--checkpoint",
               ck["pickled_code"], "--device", "cpu", "--quiet")
    assert_one_error_line(r, ck["pickled_code"], "refused", "pickled code")
    assert not ck["pickled_code_marker"].exists()
    assert files_in(tmp_path) == []
    # The file is a real attack: an unsafe loader runs its code.
    torch.load(ck["pickled_code"], weights_only=False)
    assert ck["pickled_code_marker"].exists()
    ck["pickled_code_marker"].unlink()


def test_infer_folder_keeps_going_past_bad_scans(f, ck, tmp_path, capsys):
    scans, out = tmp_path / "scans", tmp_path / "masks"
    scans.mkdir()
    out.mkdir()
    for kind in ("ct", "truncated", "2d", "constant"):
        (scans / f"{kind}.nii.gz").write_bytes(f[kind].read_bytes())
    (out / "constant.nii.gz").write_bytes(b"earlier result")
    code, _, err = cli(infer.main, infer.parse_args, ["--input", scans, "--output", out, "--checkpoint", ck["good"],
                                                      "--device", "cpu", "--no-png", "--quiet"], capsys)
    assert code == 1, err
    assert files_in(out) == ["constant.nii.gz", "ct.nii.gz", "ct_statistics.json", "statistics.csv"]
    same_grid(out / "ct.nii.gz", f["ct"])
    assert (out / "constant.nii.gz").read_bytes() == b"earlier result"
    assert err[-1] == "error: 3 of 4 scans failed (listed above)"
    for kind, why in (("truncated", "damaged"), ("2d", "2D"), ("constant", "--overwrite")):
        assert any(line.startswith(f"  {kind}: ") and why in line for line in err), (kind, err)


# ---------------------------------------------------------------------------------------------
# infer.py: out of GPU memory (a fake one: the predictor raises torch.cuda.OutOfMemoryError)


def fake_predictor(self, windows):
    """Cheap class scores that depend on each window's content, in place of the VNet."""
    return torch.cat([windows * k - windows.mean() for k in range(len(LABELS))], 1).softmax(1)


@pytest.mark.parametrize("fail_on,warnings", [((), 0), ((0,), 1), ((2,), 1), ((0, 9), 2), ((0, 9, 27), 2)],
                         ids=["none", "first-call", "mid-volume", "then-at-batch-1", "then-stitching-on-cpu"])
def test_infer_out_of_memory_falls_back(fail_on, warnings, f, ck, tmp_path, monkeypatch, capsys):
    """Calls numbered across attempts: 9 calls of 2 windows at --sw-batch 2 (18 windows), then 18
    calls of one window; fail_on lists the calls that run out of memory."""
    calls = {"n": 0, "batches": set()}

    def flaky(self, windows):
        calls["n"] += 1
        if calls["n"] - 1 in fail_on:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        calls["batches"].add(windows.shape[0])
        return fake_predictor(self, windows)

    monkeypatch.setattr(infer.Segmenter, "predictor", flaky)
    out = tmp_path / "seg.nii.gz"
    argv = ["--input", f["ct"], "--output", out, "--checkpoint", ck["good"], "--device", "cpu", "--quiet",
            "--no-png", "--sw-batch", "2", "--window", "32"]
    code, _, err = cli(infer.main, infer.parse_args, argv, capsys)
    assert len([line for line in err if line.startswith("warning: out of memory")]) == warnings, err
    if len(fail_on) < 3:
        assert code == 0 and len(err) == warnings, err
        # Windows of 2 until the first failure, then of 1 (the partial sums of the failed pass discarded).
        assert calls["batches"] == ({2} if not fail_on else {1} if fail_on[0] == 0 else {1, 2})
        if len(fail_on) == 2:
            assert "stitched on the CPU" in err[1]
        monkeypatch.setattr(infer.Segmenter, "predictor", fake_predictor)
        plain = tmp_path / "plain.nii.gz"
        assert cli(infer.main, infer.parse_args, [*argv[:3], plain, *argv[4:]], capsys)[0] == 0
        assert np.array_equal(np.asarray(nib.load(out).dataobj), np.asarray(nib.load(plain).dataobj))
    else:  # one window per call, stitched on the CPU, still out of memory: a clear error, no output
        assert code == 1 and err[-1].startswith("error: ") and "out of memory" in err[-1], err
        assert "--sw-batch 1" in err[-1] and str(f["ct"]) in err[-1]
        assert files_in(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# visualize.py (meshes: no rendering, so each run is quick; one still is rendered)


@pytest.mark.parametrize("kind", ["missing", "empty", "truncated", "wrong_ext", "2d", "4d", "nan_label",
                                  "unknown_label", "ct"])
def test_visualize_bad_label_map(kind, f, tmp_path, capsys):
    code, _, err = cli(visualize.main, visualize.parse_args, ["--input", f[kind], "--mesh", tmp_path / "m", "--quiet"],
                       capsys)
    assert_one_error(code, err, f[kind])
    assert files_in(tmp_path) == []


def test_visualize_bad_ct_and_outputs(f, tmp_path, capsys):
    def run(*argv):
        return cli(visualize.main, visualize.parse_args, ["--input", f["label"], "--quiet", *argv], capsys)

    for kind in ("truncated", "2d", "constant", "far_ct"):
        code, _, err = run("--ct", f[kind], "--mesh", tmp_path / "m")
        assert_one_error(code, err, f[kind])
    under_a_file = f["a_file"] / "still.png"
    assert_one_error(*run("--png", under_a_file)[::2], under_a_file, "not a folder")
    assert_one_error(*run("--mesh", f["a_file"] / "meshes")[::2], f["a_file"], "not a folder")
    assert files_in(tmp_path) == []
    png = tmp_path / "still.png"
    png.write_bytes(b"earlier still")
    assert_one_error(*run("--png", png)[::2], png, "--overwrite")
    assert png.read_bytes() == b"earlier still"
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "liver.stl").write_bytes(b"earlier mesh")
    assert_one_error(*run("--mesh", tmp_path / "m")[::2], tmp_path / "m", "--overwrite")
    assert (tmp_path / "m" / "liver.stl").read_bytes() == b"earlier mesh"
    code, _, err = run("--mesh", tmp_path / "m", "--overwrite")
    assert code == 0 and (tmp_path / "m" / "liver.stl").read_bytes().startswith(b"abdomen-vnet liver"), err


@pytest.mark.parametrize("label,extra,warnings", [
    ("constant_label", [], 0),
    ("background_label", [], 0),  # a scan without organs: no mesh, exit 0 (tests/test_visualize.py has more)
    ("small_label", [], 0),
    ("thick_label", ["--ct", "thick"], 0),
    ("label", ["--ct", "extreme"], 0),
    ("label", ["--ct", "nan"], 1),
    ("label", ["--reference", "mismatch_label"], 0),
], ids=["constant", "no_organ", "small", "thick", "extreme_hu", "nan_ct", "reference_on_another_grid"])
def test_visualize_unusual_but_valid(label, extra, warnings, f, tmp_path, capsys):
    argv = ["--input", f[label], *[f[a] if a in f else a for a in extra], "--mesh", tmp_path / "m", "--quiet"]
    code, _, err = cli(visualize.main, visualize.parse_args, argv, capsys)
    assert code == 0, err
    present = np.unique(np.asarray(nib.load(f[label]).dataobj))
    assert files_in(tmp_path / "m") == sorted(f"{LABELS[v]}.stl" for v in present if v)
    assert len(err) == warnings and all(line.startswith("warning: ") for line in err), err


def test_visualize_renders_a_thick_slice_still(f, tmp_path, capsys):
    png = tmp_path / "still.png"
    code, _, err = cli(visualize.main, visualize.parse_args, ["--input", f["thick_label"], "--ct", f["thick"],
                                                              "--png", png, "--size", "128x96", "--quiet"], capsys)
    assert code == 0 and err == [], err
    assert files_in(tmp_path) == ["still.png"]


def test_visualize_cli_refuses_a_truncated_map(f, tmp_path):
    r = script("visualize.py", "--input", f["truncated"], "--png", tmp_path / "still.png", "--quiet")
    assert_one_error_line(r, f["truncated"])
    assert files_in(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# train.py


def dataset(root: Path, f: dict[str, Path], pairs: list[tuple[str, str]]) -> Path:
    """An nnU-Net-style folder: two good cases plus the (image, label) pairs given as keys of f
    (a missing key: no file)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    for i, (image, label) in enumerate([("ct", "label"), ("ct", "label"), *pairs]):
        if f[image].exists():
            (root / "imagesTr" / f"case{i}_0000.nii.gz").write_bytes(f[image].read_bytes())
        if label and f[label].exists():
            (root / "labelsTr" / f"case{i}.nii.gz").write_bytes(f[label].read_bytes())
    return root


@pytest.mark.parametrize("pair,bad", [
    (("truncated", "label"), "imagesTr/case2_0000.nii.gz"),
    (("2d", "label"), "imagesTr/case2_0000.nii.gz"),
    (("nan", "label"), "imagesTr/case2_0000.nii.gz"),
    (("constant", "label"), "imagesTr/case2_0000.nii.gz"),  # no air: not HU, would skew the statistics
    (("ct", "mismatch_label"), "labelsTr/case2.nii.gz"),
    (("ct", "unknown_label"), "labelsTr/case2.nii.gz"),
    (("ct", "missing"), "case2"),
], ids=["truncated", "2d", "nan", "not_hu", "mismatch", "unknown_labels", "missing_label"])
def test_train_bad_case(pair, bad, f, tmp_path):
    data = dataset(tmp_path / "data", f, [pair])
    with pytest.raises(UserError) as e:
        train.main(train.parse_args([*TRAIN_FAST, "--data", str(data), "--out", str(tmp_path / "runs")]))
    message = str(e.value)
    assert "\n" not in message and bad in message, message
    assert not (tmp_path / "runs").exists()


def test_train_bad_arguments(f, ck, tmp_path, capsys):
    def run(*argv):
        return cli(train.main, train.parse_args, [*TRAIN_FAST, *argv], capsys)

    assert_one_error(*run("--data", tmp_path / "nope", "--out", tmp_path)[::2], tmp_path / "nope")
    assert_one_error(*run("--data", f["ct"], "--out", tmp_path)[::2], f["ct"])
    # The output checks come before the data is read: a dataset is not needed for them.
    data = tmp_path / "never read"
    assert_one_error(*run("--data", data, "--out", f["a_file"])[::2], f["a_file"], "not a folder")
    assert_one_error(*run("--data", data, "--out", "/proc")[::2], "/proc", "cannot write")
    (tmp_path / "runs" / "r").mkdir(parents=True)
    assert_one_error(*run("--data", data, "--out", tmp_path / "runs", "--run", "r")[::2], tmp_path / "runs" / "r",
                     "--resume")
    assert_one_error(*run("--resume", tmp_path / "runs" / "r")[::2], "last.pt")
    assert_one_error(*run("--resume", ck["truncated"])[::2], ck["truncated"])
    assert_one_error(*run("--resume", ck["pickled_code"])[::2], ck["pickled_code"], "refused")
    assert not ck["pickled_code_marker"].exists()
    assert_one_error(*run("--data", data, "--out", tmp_path, "--batch-size", "1")[::2], "--batch-size 2")
    assert files_in(tmp_path) == ["runs"]
    assert files_in(tmp_path / "runs") == ["r"] and files_in(tmp_path / "runs" / "r") == []


def test_train_unusual_but_valid_cases(f, tmp_path):
    pairs = [("small", "small_label"), ("thick", "thick_label"), ("extreme", "label")]
    data = dataset(tmp_path / "data", f, pairs)
    summary = train.main(train.parse_args([*TRAIN_FAST, "--data", str(data), "--out", str(tmp_path), "--run", "r"]))
    assert summary["epochs_run"] == 1
    assert files_in(tmp_path / "r") == ["best.pt", "curves.png", "last.pt", "metrics.csv", "metrics.json"]


def test_train_cli_bad_case_is_one_line(f, tmp_path):
    data = dataset(tmp_path / "data", f, [("4d", "label")])
    r = script("train.py", *TRAIN_FAST, "--data", data, "--out", tmp_path / "runs")
    assert_one_error_line(r, data / "imagesTr" / "case2_0000.nii.gz", "4D")
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------------------------------------
# dataset.py --check (subprocesses: its command line is the interface)


def test_check_reports_every_bad_case(f, tmp_path):
    pairs = [("empty", "label"), ("truncated", "label"), ("2d", "label"), ("4d", "label"), ("nan", "label"),
             ("ct", "mismatch_label"), ("ct", "unknown_label")]
    data = dataset(tmp_path / "data", f, pairs)
    r = script("dataset.py", "--check", data, "--label-map", "identity")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    report = r.stdout + r.stderr
    for i, (image, _) in enumerate(pairs, start=2):
        bad = f"imagesTr/case{i}_0000.nii.gz" if image != "ct" else f"labelsTr/case{i}.nii.gz"
        assert bad in report, (bad, report)
    assert "case0" in report and "case1" in report  # the good cases are reported too


def test_check_accepts_unusual_but_valid_cases(f, tmp_path):
    pairs = [("small", "small_label"), ("thick", "thick_label"), ("extreme", "label")]
    r = script("dataset.py", "--check", dataset(tmp_path / "data", f, pairs), "--label-map", "identity")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert all(f"case{i}" in r.stdout for i in range(5))


def test_check_missing_folder(tmp_path):
    r = script("dataset.py", "--check", tmp_path / "nope", "--label-map", "identity")
    assert_one_error_line(r, tmp_path / "nope")


# ---------------------------------------------------------------------------------------------
# Writers


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    """A writer that dies half-way (here an exception; a kill is tested in test_resume.py) leaves
    the previous file whole and no temporary file."""
    import nibabel

    target = tmp_path / "seg.nii.gz"
    save_nifti(target, np.ones((4, 4, 4), np.uint8), np.eye(4))
    before = target.read_bytes()

    def half_then_fail(img, filename):
        Path(filename).write_bytes(before[: len(before) // 2])
        raise OSError(28, "No space left on device", str(filename))

    monkeypatch.setattr(nibabel, "save", half_then_fail)
    with pytest.raises(OSError):
        save_nifti(target, np.zeros((4, 4, 4), np.uint8), np.eye(4))
    assert target.read_bytes() == before and files_in(tmp_path) == ["seg.nii.gz"]
