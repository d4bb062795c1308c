"""The benchmarks' helpers: scans built for bench_scale.py, summaries of interleaved repeats, the
sliding-window geometry bench_infer.py reports for MONAI."""

import nibabel as nib
import numpy as np
from conftest import REAL, ROOT, needs_real

from bench.bench_infer import monai_windows
from bench.bench_scale import make_scan
from bench.benchutil import git_commit, provenance, ratio_of_medians, summary
from utils import save_nifti, window_starts


def test_make_scan_repeats_slices_over_the_extent(tmp_path):
    data = np.arange(4 * 3 * 5, dtype=np.int16).reshape(4, 3, 5)
    affine = np.diag([-0.5, -0.5, 2.0, 1.0])
    save_nifti(tmp_path / "src.nii.gz", data, affine)
    shape = make_scan(tmp_path / "src.nii.gz", 12, 9.0, tmp_path / "big.nii.gz")
    img = nib.load(tmp_path / "big.nii.gz")
    big = np.asanyarray(img.dataobj)
    assert shape == big.shape == (4, 3, 12) and big.dtype == np.int16
    np.testing.assert_allclose(img.affine[:3, :3], np.diag([-0.5, -0.5, 0.75]))
    # each new slice repeats the source slice that holds its centre
    assert [int(big[0, 0, k]) for k in range(12)] == [int(data[0, 0, (2 * k + 1) * 5 // 24]) for k in range(12)]


def test_summary_and_ratio_of_medians():
    assert summary([3.0, 1.0, 2.0]) == {"min": 1.0, "median": 2.0, "all": [3.0, 1.0, 2.0]}
    assert ratio_of_medians([1.0, 2.0, 9.0], [4.0, 4.0, 1.0]) == 0.5


def test_provenance_names_machine_and_commit():
    p = provenance(2)
    assert p["machine"]["threads"] == 2 and p["machine"]["cores"] >= 1 and p["machine"]["torch"]
    assert p["commit"] == git_commit() and (p["commit"] == "unknown" or len(p["commit"]) >= 40)
    assert (ROOT / "bench" / "benchutil.py").is_file()


def test_monai_window_count_is_ours():
    for shape, roi in (((97, 97, 70), (96, 96, 80)), ((200, 150, 90), (160, 150, 96)), ((40, 40, 40), (48, 48, 48))):
        ours = np.prod([len(window_starts(max(s, r), r, 0.5)) for s, r in zip(shape, roi)])
        assert monai_windows(shape, roi, 0.5)["windows"] == ours


@needs_real
def test_bench_pathology_scores_each_checkpoint_on_the_same_held_out_phantoms(tmp_path):
    """One row, one phantom, the shipped model twice: both names get the same Dice, the mass row
    scores its mass, and the table and JSON are written."""
    from bench.bench_pathology import main, parse_args

    shipped = str(ROOT / "checkpoints" / "phantom_small.pt")
    atlas = tmp_path / "atlas"
    atlas.mkdir()
    (atlas / "FLARE22_Tr_0001.nii.gz").symlink_to(REAL / "flare22_labels" / "FLARE22_Tr_0001.nii.gz")
    report = main(parse_args(["--checkpoints", f"{shipped},{shipped}", "--rows", "mass", "--cases", "1",
                              "--spacing", "4", "--atlas", str(atlas),
                              "--out", str(tmp_path)]))
    a, b = report["rows"]
    assert a["dice"] == b["dice"] and all(0 <= v <= 1 for v in a["dice"].values())
    assert a["structure_kind"] == "mass" and len(a["structure"]) == 1 and 0 <= a["structure"][0] <= 100
    assert report["min_ml"] == 20 and report["organs_skipped_as_slivers"] >= 0
    assert (tmp_path / "pathology.json").is_file() and "mass painted as organ" in (tmp_path / "pathology.md").read_text()
    (detail,) = a["mass_detail"]
    assert detail["ml"] > 0 and abs(sum(detail["painted_as"].values()) - a["structure"][0]) < 1e-6
    assert "| mass | 0 |" in (tmp_path / "pathology.md").read_text()


@needs_real
def test_bench_pathology_renal_mass_row_needs_kits23_shapes_and_scores_the_intrarenal_part(tmp_path, capsys):
    """The renal_mass row pastes a real KiTS23 shape and scores its part inside the kidney; without KiTS23 maps among
    --atlas it says why it did not run and writes no row."""
    from bench.bench_pathology import main, parse_args

    shipped = str(ROOT / "checkpoints" / "phantom_small.pt")
    atlas = tmp_path / "atlas"
    atlas.mkdir()
    (atlas / "FLARE22_Tr_0001.nii.gz").symlink_to(REAL / "flare22_labels" / "FLARE22_Tr_0001.nii.gz")
    args = ["--checkpoints", shipped, "--rows", "renal_mass", "--cases", "1", "--spacing", "4", "--out", str(tmp_path)]
    assert main(parse_args(args + ["--atlas", str(atlas)]))["rows"] == []
    assert "needs KiTS23 label maps" in capsys.readouterr().out
    kits = tmp_path / "kits"
    kits.mkdir()
    (kits / "case_00002.nii.gz").symlink_to(REAL / "kits23_labels" / "case_00002.nii.gz")
    (row,) = main(parse_args(args + ["--atlas", f"{atlas},{kits}"]))["rows"]
    assert row["structure_kind"] == "renal_mass" and len(row["structure"]) == 1 and 0 <= row["structure"][0] <= 100
    assert "renal tumour missed" in (tmp_path / "pathology.md").read_text()


def test_bench_pathology_mass_table_gives_each_mass_and_what_each_checkpoint_painted_it_as():
    """A 2x2x2 mass against the liver, half of it painted liver by one checkpoint, none by the other."""
    from bench.bench_pathology import mass_detail, mass_table

    label = np.zeros((8, 8, 8), np.uint8)
    label[:3] = 1
    mass = np.zeros(label.shape, bool)
    mass[3:5, 3:5, 3:5] = True
    hu = np.where(mass, 10, 60).astype(np.int16)
    pred = np.zeros_like(label)
    pred[3, 3:5, 3:5] = 1
    half, none = (mass_detail(p, label, hu, mass, 2.0) for p in (pred, np.zeros_like(label)))
    assert half["ml"] == 0.064 and half["median_hu"] == 10 and half["painted_as"]["liver"] == 50
    assert half["touches"]["liver"] > 0 and half["touches"]["spleen"] == 0
    rows = [{"row": "mass", "checkpoint": c, "structure_kind": "mass", "mass_detail": [d]}
            for c, d in (("a.pt", half), ("b.pt", none))]
    table = mass_table(rows).splitlines()
    assert table[0].endswith("| a.pt | b.pt |") and table[2].startswith("| mass | 0 | 0 | 10 | liver ")
    assert table[2].endswith("| 50.0 % (liver 50) | 0.0 % |")
    assert mass_table([{"row": "portal", "checkpoint": "a.pt", "structure_kind": None}]) == ""
