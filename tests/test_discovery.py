"""Dataset discovery, label maps, the preprocessing cache and dataset checks, on fake FLARE22 / BTCV /
AMOS / WORD / MSD / TotalSegmentator / datalist layouts of tiny volumes."""

import json
import os
import re
import time

import nibabel as nib
import numpy as np
import pytest

import dataset
import train
from dataset import (
    PatchDataset,
    case_label_maps,
    discover,
    load_case,
    parse_label_map,
    prepare_volumes,
    remap_labels,
)
from utils import Preprocessing, UserError, run_cli, save_nifti

SHAPE = (16, 12, 10)
AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])  # RAS: axis 0 runs to the patient's right
# Our organs as boxes: liver and right kidney at high axis-0 indices (the patient's right).
BOXES = {
    1: np.s_[10:15, 6:11, 5:9],  # liver
    2: np.s_[10:13, 1:4, 2:5],  # right kidney
    3: np.s_[3:6, 1:4, 2:5],  # left kidney
    4: np.s_[1:5, 6:10, 5:9],  # spleen
    0: np.s_[7:9, 6:9, 2:4],  # another organ (a source value that maps to background)
}
FLARE22 = {1: 1, 2: 2, 3: 13, 4: 3, 0: 5}
BTCV = {1: 6, 2: 2, 3: 3, 4: 1, 0: 11}
WORD = {1: 1, 2: 4, 3: 3, 4: 2, 0: 8}
TOTALSEG = {1: 5, 2: 2, 3: 3, 4: 1, 0: 52}
OURS = {1: 1, 2: 2, 3: 3, 4: 4, 0: 0}


def ct() -> np.ndarray:
    image = np.full(SHAPE, -1000, dtype=np.int16)
    image[1:15, 1:11, :] = 40
    for ours, box in BOXES.items():
        image[box] = 60 + 10 * ours
    return image


def label(source: dict[int, int], dtype=np.uint8) -> np.ndarray:
    out = np.zeros(SHAPE, dtype=dtype)
    for ours, box in BOXES.items():
        out[box] = source[ours]
    return out


def ours() -> np.ndarray:
    return label({**OURS, 0: 0})


def write_pair(image_path, label_path, source, affine=AFFINE):
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    save_nifti(image_path, ct(), affine)
    save_nifti(label_path, label(source), affine)


def write_totalseg_case(folder, organs=("liver", "kidney_right", "kidney_left", "spleen", "aorta")):
    (folder / "segmentations").mkdir(parents=True)
    save_nifti(folder / "ct.nii.gz", ct(), AFFINE)
    values = {"liver": 1, "kidney_right": 2, "kidney_left": 3, "spleen": 4, "aorta": 0}
    for organ in organs:
        save_nifti(folder / "segmentations" / f"{organ}.nii.gz", (ours() == values[organ]).astype(np.uint8)
                   if values[organ] else np.zeros(SHAPE, np.uint8), AFFINE)


PREP = Preprocessing(spacing=(2.0, 2.0, 2.0))


def loaded_label(case, label_map):
    """The label of load_case, put back on the uncropped grid for comparison with ours()."""
    v = load_case(case, PREP, label_map)
    full = np.zeros(SHAPE, np.uint8)
    start = np.round(np.linalg.solve(AFFINE, v.affine)[:3, 3]).astype(int)
    full[tuple(slice(s, s + n) for s, n in zip(start, v.label.shape))] = v.label
    return full


# ---------------------------------------------------------------------------------------------
# Layouts


def test_flare22_layout_nested_and_detected(tmp_path):
    for n in (1, 2):
        write_pair(tmp_path / "FLARE22Train" / "images" / f"FLARE22_Tr_000{n}_0000.nii.gz",
                   tmp_path / "FLARE22Train" / "labels" / f"FLARE22_Tr_000{n}.nii.gz", FLARE22)
    found = discover(tmp_path)
    assert found.layout == "flare22" and found.root == tmp_path / "FLARE22Train"
    assert [c.name for c in found.cases] == ["FLARE22_Tr_0001", "FLARE22_Tr_0002"]
    assert found.label_map == "flare22"
    assert np.array_equal(loaded_label(found.cases[0], "flare22"), ours())  # 13 -> left kidney, 3 -> spleen


def test_btcv_layout(tmp_path):
    root = tmp_path / "Abdomen" / "RawData" / "Training"
    for n in (1, 2):
        write_pair(root / "img" / f"img000{n}.nii.gz", root / "label" / f"label000{n}.nii.gz", BTCV)
    found = discover(tmp_path)
    assert found.layout == "btcv" and len(found.cases) == 2 and found.label_map == "btcv"
    assert found.cases[1].label.name == "label0002.nii.gz"
    assert np.array_equal(loaded_label(found.cases[0], found.label_map), ours())


def test_word_layout_by_file_names(tmp_path):
    for n in (1, 2):
        write_pair(tmp_path / "imagesTr" / f"word_000{n}.nii.gz", tmp_path / "labelsTr" / f"word_000{n}.nii.gz", WORD)
    found = discover(tmp_path)
    assert found.layout == "nnunet" and found.label_map == "word"
    assert [c.name for c in found.cases] == ["word_0001", "word_0002"]
    assert np.array_equal(loaded_label(found.cases[0], "word"), ours())


def test_amos_dataset_json_names_and_mri_left_out(tmp_path):
    names = ["background", "spleen", "right kidney", "left kidney", "gall bladder", "esophagus", "liver", "stomach",
             "arota", "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder",
             "prostate/uterus"]
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {str(i): n for i, n in enumerate(names)}}))
    for n in ("0001", "0002", "0507"):
        write_pair(tmp_path / "imagesTr" / f"amos_{n}.nii.gz", tmp_path / "labelsTr" / f"amos_{n}.nii.gz", BTCV)
    found = discover(tmp_path)
    assert found.label_map == "amos" and "dataset.json" in found.label_map_source
    assert [c.name for c in found.cases] == ["amos_0001", "amos_0002"]
    assert "MRI" in found.notes[0]


def test_msd_liver_tumour_is_liver_and_hidden_files_skipped(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "cancer"}}))
    write_pair(tmp_path / "imagesTr" / "liver_0.nii.gz", tmp_path / "labelsTr" / "liver_0.nii.gz", {**OURS, 2: 0, 3: 0, 4: 0})
    (tmp_path / "imagesTr" / "._liver_0.nii.gz").write_bytes(b"\0macOS fork")
    found = discover(tmp_path)
    assert found.label_map == "msd_liver" and len(found.cases) == 1
    assert remap_labels(np.array([0, 1, 2]), "msd_liver").tolist() == [0, 1, 1]
    assert remap_labels(np.array([0, 1]), "msd_spleen").tolist() == [0, 4]


def test_nnunet_v2_label_names(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    write_pair(tmp_path / "imagesTr" / "case_0000.nii.gz", tmp_path / "labelsTr" / "case.nii.gz", OURS)
    labels = {"background": 0, "spleen": 1, "Liver": 2, "pancreas": 3, "kidney_R": 4, "Left Kidney": 5}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    found = discover(tmp_path)
    assert found.cases[0].name == "case" and found.cases[0].label.name == "case.nii.gz"
    lm = parse_label_map(found.label_map)
    assert lm.mapping == {1: 4, 2: 1, 4: 2, 5: 3} and lm.allowed == {0, 1, 2, 3, 4, 5}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "kidney": 1, "tumor": 2}}))
    with pytest.raises(UserError, match="does not say which kidney"):
        discover(tmp_path)


# MONAI's BTCV datalist (dataset_0.json) names the kidneys rkid and lkid.
MONAI_BTCV_NAMES = {0: "background", 1: "spleen", 2: "rkid", 3: "lkid", 4: "gall", 5: "eso", 6: "liver", 7: "sto",
                    8: "aorta", 9: "IVC", 10: "veins", 11: "pancreas", 12: "rad", 13: "lad"}


@pytest.mark.parametrize("right,left", [("rkid", "lkid"), ("RKidney", "LKidney"), ("right renal", "left renal"),
                                        ("kidney_r", "kidney_l"), ("R_kidney", "L_kidney"), ("KidneyRight", "KidneyLeft"),
                                        ("Kidney (R)", "Kidney (L)"), ("rt kidney", "lt kidney")])
def test_kidney_short_forms_are_read(right, left):
    names = {0: "background", 1: "spleen", 2: right, 3: left, 6: "liver", 7: "right adrenal gland",
             8: "left renal vein"}
    assert parse_label_map(dataset.map_from_label_names(names, "d.json")).mapping == {1: 4, 2: 2, 3: 3, 6: 1}


def test_monai_btcv_names_are_the_btcv_map(tmp_path, capsys):
    assert dataset.map_from_label_names(MONAI_BTCV_NAMES, "d.json") == "btcv"
    write_pair(tmp_path / "imagesTr" / "img0001.nii.gz", tmp_path / "labelsTr" / "img0001.nii.gz", BTCV)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {str(k): v for k, v in MONAI_BTCV_NAMES.items()}}))
    run_cli(dataset.main, dataset.parse_args(["--check", str(tmp_path)]))
    out = capsys.readouterr().out
    assert "label map btcv (from label names in dataset.json)" in out
    assert "liver 0.8 mL, right_kidney 0.2 mL, left_kidney 0.2 mL, spleen 0.5 mL" in out


@pytest.mark.parametrize("names,message", [
    ({1: "liver", 2: "renal", 3: "spleen"}, r"label 2 'renal' looks like a kidney but does not say which"),
    ({1: "liver", 2: "kidneys", 3: "spleen"}, "label 2 'kidneys' looks like a kidney"),
    ({1: "liver", 2: "kid_rl", 3: "spleen"}, "label 2 'kid_rl' looks like a kidney"),
    ({1: "liver", 2: "right kidney", 3: "left kidney", 4: "kidney tumor"}, "label 4 'kidney tumor' looks like a kidney"),
    # Our kidneys under names not read here would train as background.
    ({1: "spleen", 2: "RK", 3: "LK", 6: "liver", 7: "stomach"},
     r"give liver, spleen but no right_kidney, left_kidney \(unread names: 2 'RK', 3 'LK', 7 'stomach'\).*--label-map"),
    ({1: "liver", 2: "right kidney"}, "give liver, right_kidney but no left_kidney, spleen"),
])
def test_label_names_that_cannot_be_placed_are_refused(names, message):
    with pytest.raises(UserError, match=message):
        dataset.map_from_label_names(names, "d.json")


def test_lesions_join_only_their_own_organ():
    # A pancreatic tumour is background, not liver; a liver tumour and a kidney cyst join their organ.
    names = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen", 5: "pancreas", 6: "pancreas tumor",
             7: "liver tumour", 8: "kidney_cyst_left"}
    lm = parse_label_map(dataset.map_from_label_names(names, "d.json"))
    assert lm.mapping == {1: 1, 2: 2, 3: 3, 4: 4, 7: 1, 8: 3} and lm.allowed == set(range(9))
    # A lesion naming no organ joins the liver in a liver-only dataset only.
    assert dataset.map_from_label_names({0: "background", 1: "liver", 2: "cancer"}, "d.json") == "msd_liver"
    with pytest.raises(UserError, match="label 3 'tumor' does not name its organ"):
        dataset.map_from_label_names({1: "liver", 2: "pancreas", 3: "tumor"}, "d.json")
    with pytest.raises(UserError, match="give liver but no .*--label-map"):  # the case: not silently liver
        dataset.map_from_label_names({1: "liver", 2: "pancreas", 3: "pancreas tumor"}, "d.json")


def test_nnunet_ignore_label_is_refused(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    write_pair(tmp_path / "imagesTr" / "case_0000.nii.gz", tmp_path / "labelsTr" / "case.nii.gz", OURS)
    labels = {"background": 0, "liver": 1, "right kidney": 2, "left kidney": 3, "spleen": 4, "ignore": 5}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": labels}))
    with pytest.raises(UserError, match=r"label 5 'ignore' is nnU-Net's ignore label .*unannotated"):
        discover(tmp_path)


def test_msd_names_numbered_from_0000_are_cases(tmp_path):
    for n in ("0000", "0001", "0002"):
        write_pair(tmp_path / "imagesTr" / f"spleen_{n}.nii.gz", tmp_path / "labelsTr" / f"spleen_{n}.nii.gz",
                   {**OURS, 1: 0, 2: 0, 3: 0, 4: 1})
    found = discover(tmp_path)
    assert [c.name for c in found.cases] == ["spleen_0000", "spleen_0001", "spleen_0002"]
    assert [c.label.name for c in found.cases] == [f"spleen_000{n}.nii.gz" for n in range(3)]
    assert found.label_map == "msd_spleen"


def test_second_channel_and_missing_label_are_errors(tmp_path):
    write_pair(tmp_path / "imagesTr" / "a_0000.nii.gz", tmp_path / "labelsTr" / "a.nii.gz", OURS)
    save_nifti(tmp_path / "imagesTr" / "a_0001.nii.gz", ct(), AFFINE)
    with pytest.raises(UserError, match="a_0001.nii.gz: a second image channel"):
        discover(tmp_path)
    (tmp_path / "imagesTr" / "a_0001.nii.gz").unlink()
    save_nifti(tmp_path / "imagesTr" / "b_0000.nii.gz", ct(), AFFINE)
    with pytest.raises(UserError, match=r"b_0000.nii.gz: no label .*labelsTr/b.nii.gz"):
        discover(tmp_path)
    assert [c.label for c in discover(tmp_path, strict=False).cases][1] is None


def test_totalseg_per_organ_masks_combine_into_ours(tmp_path):
    write_totalseg_case(tmp_path / "s0001")
    write_totalseg_case(tmp_path / "s0002")
    write_totalseg_case(tmp_path / "s0003")
    (tmp_path / "meta.csv").write_text("image_id;age;split\ns0001;60;train\ns0002;50;val\ns0003;70;test\n")
    found = discover(tmp_path)
    assert found.layout == "totalseg" and [c.name for c in found.cases] == ["s0001", "s0002"]
    assert [c.split for c in found.cases] == ["training", "validation"] and "test split" in found.notes[0]
    assert case_label_maps(found, "btcv") == ["identity", "identity"]  # masks are ours whatever the flag
    assert np.array_equal(loaded_label(found.cases[0], "identity"), ours())
    (tmp_path / "s0001" / "segmentations" / "spleen.nii.gz").unlink()
    with pytest.raises(UserError, match=r"s0001/segmentations/spleen.nii.gz: missing"):
        load_case(found.cases[0], PREP, "identity")
    save_nifti(tmp_path / "s0001" / "segmentations" / "spleen.nii.gz", label(BTCV), AFFINE)
    with pytest.raises(UserError, match="spleen.nii.gz: not a binary mask"):
        load_case(found.cases[0], PREP, "identity")


def test_totalseg_multilabel_case_folder(tmp_path):
    case = tmp_path / "totalseg_example"
    write_pair(case / "ct.nii.gz", case / "segmentation.nii.gz", TOTALSEG)
    found = discover(case)
    assert found.cases[0].name == "totalseg_example" and found.label_map == "totalseg"
    assert np.array_equal(loaded_label(found.cases[0], "totalseg"), ours())
    assert remap_labels(np.array([0, 5, 110]), "totalseg").tolist() == [0, 1, 0]  # v2 has 117 classes
    with pytest.raises(UserError, match=r"label values \[120\] are not in the 'totalseg' label map"):
        remap_labels(np.array([0, 5, 120]), "totalseg", "seg.nii.gz")


def test_datalist_relative_paths_per_entry_maps_and_validation(tmp_path):
    write_pair(tmp_path / "a" / "img.nii.gz", tmp_path / "a" / "seg.nii.gz", BTCV)
    write_pair(tmp_path / "b" / "FLARE22_Tr_0001_0000.nii.gz", tmp_path / "b" / "FLARE22_Tr_0001.nii.gz", FLARE22)
    write_totalseg_case(tmp_path / "c")
    lists = tmp_path / "lists"
    lists.mkdir()
    datalist = {
        "label_map": "btcv",
        "training": [{"image": "../a/img.nii.gz", "label": "../a/seg.nii.gz"},
                     {"image": "../b/FLARE22_Tr_0001_0000.nii.gz", "label": "../b/FLARE22_Tr_0001.nii.gz",
                      "label_map": "flare22"}],
        "validation": [{"image": "../c/ct.nii.gz", "label": "../c/segmentations", "name": "val"}],
    }
    (lists / "data.json").write_text(json.dumps(datalist))
    found = discover(lists / "data.json")
    assert [c.name for c in found.cases] == ["a", "FLARE22_Tr_0001", "val"]
    assert [c.split for c in found.cases] == ["training", "training", "validation"]
    maps = case_label_maps(found)
    assert maps == ["btcv", "flare22", "identity"]
    for case, name in zip(found.cases, maps):
        assert np.array_equal(loaded_label(case, name), ours()), case.name
    datalist["training"][0]["image"] = "../a/missing.nii.gz"
    (lists / "data.json").write_text(json.dumps(datalist))
    with pytest.raises(UserError, match=r"data.json: training\[0\]: image .*missing.nii.gz does not exist"):
        discover(lists / "data.json")
    (lists / "bad.json").write_text('{"train": []}')
    with pytest.raises(UserError, match='bad.json: a datalist is a JSON object with a "training" list'):
        discover(lists / "bad.json")


def test_several_datasets_or_none(tmp_path):
    for sub in ("one", "two"):
        write_pair(tmp_path / sub / "imagesTr" / "x_0000.nii.gz", tmp_path / sub / "labelsTr" / "x.nii.gz", OURS)
    with pytest.raises(UserError, match="holds 2 datasets"):
        discover(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty: no dataset found; expected imagesTr/"):
        discover(tmp_path / "empty")


def test_undetectable_label_map_needs_the_flag(tmp_path):
    for n in (1, 2):
        write_pair(tmp_path / "imagesTr" / f"x{n}_0000.nii.gz", tmp_path / "labelsTr" / f"x{n}.nii.gz", BTCV)
    found = discover(tmp_path)
    assert found.label_map is None
    with pytest.raises(UserError, match="cannot tell the label map .* pass --label-map"):
        case_label_maps(found)
    assert case_label_maps(found, "6:1,2:2,3:3,1:4,11:0") == ["1:4,2:2,3:3,6:1,11:0"] * 2
    assert np.array_equal(loaded_label(found.cases[0], "6:1,2:2,3:3,1:4,11:0"), ours())


# ---------------------------------------------------------------------------------------------
# Label maps


def test_custom_label_maps(tmp_path):
    lm = parse_label_map("6:1,2:2,3:3,1:4")
    assert lm.mapping == {6: 1, 2: 2, 3: 3, 1: 4} and lm.allowed == {0, 1, 2, 3, 6}
    assert lm.name == "1:4,2:2,3:3,6:1"
    with pytest.raises(UserError, match=r"l.nii.gz: label values \[4, 5\] are not in the '1:4,2:2,3:3,6:1' label map"):
        remap_labels(np.array([0, 1, 4, 5, 6]), "6:1,2:2,3:3,1:4", "l.nii.gz")
    lm = parse_label_map("6:liver,2:right_kidney,3:left_kidney,1:spleen,4-5:0,7-13:0")
    assert lm.allowed == set(range(14)) and lm.name == "1:4,2:2,3:3,6:1,4-5:0,7-13:0"
    assert parse_label_map(lm.name).fingerprint() == parse_label_map("btcv").fingerprint()
    assert remap_labels(np.array([0, 1, 99]), "1:4,*:0").tolist() == [0, 4, 0]
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"6": 1, "2": "right_kidney", "3": 3, "1": "spleen", "4-13": 0}))
    assert parse_label_map(str(path)).fingerprint() == parse_label_map("btcv").fingerprint()
    (tmp_path / "lists").mkdir()
    write_pair(tmp_path / "img.nii.gz", tmp_path / "seg.nii.gz", BTCV)
    entry = {"image": "../img.nii.gz", "label": "../seg.nii.gz", "label_map": "../map.json"}
    (tmp_path / "lists" / "d.json").write_text(json.dumps({"training": [entry]}))
    assert case_label_maps(discover(tmp_path / "lists" / "d.json")) == ["1:4,2:2,3:3,6:1,4-5:0,7-13:0"]
    for bad, message in [("6:7", "target '7'"), ("x:1", "source 'x'"), ("1:1,1:2", "mapped twice"), ("1", "unknown label map"),
                         ("2:0", "maps nothing"), ("*:1", "only map to 0")]:
        with pytest.raises(UserError, match=message):
            parse_label_map(bad)


def test_remap_dtypes_and_non_integer_labels():
    src = label(FLARE22)
    for dtype in (np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64):
        assert np.array_equal(remap_labels(src.astype(dtype), "flare22"), ours())
    with pytest.raises(UserError, match="not whole numbers"):
        remap_labels(np.array([0.0, 0.5]), "identity", "x.nii.gz")
    with pytest.raises(UserError, match="negative label values"):
        remap_labels(np.array([0, -1], dtype=np.int16), "identity", "x.nii.gz")


# ---------------------------------------------------------------------------------------------
# Bad input through train.py: one line naming the file, exit code 1


def _bad_input(tmp_path, case):
    images, labels = tmp_path / "d" / "imagesTr", tmp_path / "d" / "labelsTr"
    for n in ("a", "b"):
        write_pair(images / f"{n}_0000.nii.gz", labels / f"{n}.nii.gz", OURS)
    bad = labels / "b.nii.gz"
    if case == "2d":
        bad = images / "b_0000.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((16, 12), np.int16), AFFINE), bad)
    elif case == "4d":
        bad = images / "b_0000.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((*SHAPE, 3), np.int16), AFFINE), bad)
    elif case == "shape":
        save_nifti(bad, ours()[:, :, :-1], AFFINE)
    elif case == "affine":
        shifted = AFFINE.copy()
        shifted[0, 3] = 5.0
        save_nifti(bad, ours(), shifted)
    elif case == "unreadable":
        bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    elif case == "value":
        save_nifti(bad, label({**OURS, 0: 9}), AFFINE)
    return tmp_path / "d", bad


@pytest.mark.parametrize("case,message", [("2d", "2D"), ("4d", "4D"), ("shape", "label shape"), ("affine", "label affine"),
                                          ("unreadable", "cannot read"), ("value", r"label values \[9\]")])
def test_bad_input_is_one_line_exit_1(case, message, tmp_path, capsys):
    data, bad = _bad_input(tmp_path, case)
    args = train.parse_args(["--data", str(data), "--out", str(tmp_path / "runs"), "--cache", str(tmp_path / "cache"),
                             "--label-map", "identity", "--device", "cpu", "--epochs", "1"])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(train.main, args)
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}"), lines
    assert re.search(message, lines[0]), lines[0]


# ---------------------------------------------------------------------------------------------
# dataset.py --check


def test_check_reports_every_problem_and_exits_1(tmp_path, capsys):
    data, _ = _bad_input(tmp_path, "shape")
    save_nifti(data / "imagesTr" / "c_0000.nii.gz", ct(), AFFINE)  # no label
    nan = ct().astype(np.float32)
    nan[0] = np.nan
    save_nifti(data / "imagesTr" / "d_0000.nii.gz", nan, AFFINE)
    save_nifti(data / "labelsTr" / "d.nii.gz", label({**OURS, 0: 7}), AFFINE)  # 7 is not in the map
    with pytest.raises(SystemExit) as exit_info:
        run_cli(dataset.main, dataset.parse_args(["--check", str(data), "--label-map", "identity"]))
    assert exit_info.value.code == 1
    out = capsys.readouterr().out
    assert "a: 16x12x10 int16, 2.00x2.00x2.00 mm, RAS; HU -1000..100; labels {1-4}" in out
    assert "liver 0.8 mL, right_kidney 0.2 mL, left_kidney 0.2 mL, spleen 0.5 mL" in out
    assert "b.nii.gz: label shape (16, 12, 9) differs from image shape" in out
    assert "c_0000.nii.gz: no label" in out
    assert "NaN or infinite voxels" in out and r"label values [7]" in out
    assert out.strip().splitlines()[-1] == "checked 4 cases: 1 fine, 3 with problems; 4 problems in all"


def test_check_a_good_dataset_exits_0(tmp_path, capsys):
    write_totalseg_case(tmp_path / "s0001")
    run_cli(dataset.main, dataset.parse_args(["--check", str(tmp_path)]))
    out = capsys.readouterr().out
    assert "totalseg layout, 1 case" in out and "label map identity (from " in out
    assert "checked 1 case: 1 fine, 0 with problems; 0 problems in all" in out


def test_check_flags_kidneys_on_the_wrong_side(tmp_path, capsys):
    write_pair(tmp_path / "imagesTr" / "a_0000.nii.gz", tmp_path / "labelsTr" / "a.nii.gz", {**OURS, 2: 3, 3: 2})
    assert dataset.check_dataset(tmp_path, "identity") == 1
    assert "the right_kidney lies to the patient's left of the left_kidney" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Cache


def _two_cases(tmp_path):
    for n in ("a", "b"):
        write_pair(tmp_path / "d" / "imagesTr" / f"{n}_0000.nii.gz", tmp_path / "d" / "labelsTr" / f"{n}.nii.gz", FLARE22)
    found = discover(tmp_path / "d")
    return found.cases, case_label_maps(found, "flare22")


def test_cache_builds_once_then_memory_maps(tmp_path):
    cases, maps = _two_cases(tmp_path)
    cache = tmp_path / "cache"
    assert dataset.cache_status(cases, maps, PREP, cache) == [False, False]
    volumes = prepare_volumes(cases, maps, PREP, cache, progress=False)
    assert dataset.cache_status(cases, maps, PREP, cache) == [True, True]
    direct = load_case(cases[0], PREP, maps[0])
    assert isinstance(volumes[0].image, np.memmap) and not volumes[0].image.flags.writeable
    assert np.array_equal(volumes[0].image, direct.image) and np.array_equal(volumes[0].label, direct.label)
    assert np.array_equal(volumes[0].affine, direct.affine) and volumes[0].name == "a"
    entries = sorted(p for p in cache.iterdir())
    stamps = [(p / "image.npy").stat().st_mtime_ns for p in entries]
    prepare_volumes(cases, maps, PREP, cache, progress=False)  # reused: nothing rewritten
    assert [(p / "image.npy").stat().st_mtime_ns for p in entries] == stamps
    ds_cached = PatchDataset(volumes, Preprocessing(mean=50, std=30), (8, 8, 8), 4, dataset.AugmentConfig(), seed=1)
    ds_memory = PatchDataset([direct, load_case(cases[1], PREP, maps[1])], Preprocessing(mean=50, std=30), (8, 8, 8), 4,
                             dataset.AugmentConfig(), seed=1)
    for i in range(4):
        assert all(np.array_equal(x, y) for x, y in zip(ds_cached[i], ds_memory[i]))


def test_cache_other_settings_or_changed_files_are_rebuilt(tmp_path):
    cases, maps = _two_cases(tmp_path)
    cache = tmp_path / "cache"
    prepare_volumes(cases, maps, PREP, cache, progress=False)
    coarse = Preprocessing(spacing=(4.0, 4.0, 4.0))
    assert dataset.cache_status(cases, maps, coarse, cache) == [False, False]
    assert dataset.cache_status(cases, maps, Preprocessing(spacing=PREP.spacing, clip=(-100, 300)), cache) == [False, False]
    assert dataset.cache_status(cases, ["1:1,2:2,3:4,13:3,*:0"] * 2, PREP, cache) == [False, False]
    assert prepare_volumes(cases, maps, coarse, cache, progress=False)[0].image.shape == (8, 6, 5)
    later = time.time() + 10
    os.utime(cases[1].label, (later, later))
    assert dataset.cache_status(cases, maps, PREP, cache) == [True, False]
    old = dataset.CACHE_VERSION
    try:
        dataset.CACHE_VERSION = old + 1
        assert dataset.cache_status(cases, maps, PREP, cache) == [False, False]
    finally:
        dataset.CACHE_VERSION = old


def test_cache_survives_an_interrupted_build(tmp_path):
    cases, maps = _two_cases(tmp_path)
    cache = tmp_path / "cache"
    entry, fingerprint = dataset.cache_entry(cache, cases[0], PREP, maps[0])
    partial = cache / f".tmp-{entry.name}-1-1"  # what a killed build leaves
    partial.mkdir(parents=True)
    (partial / "image.npy").write_bytes(b"\x93NUMPY half")
    entry.mkdir()  # and a damaged entry (no meta.json) is rebuilt, never read
    (entry / "image.npy").write_bytes(b"junk")
    volumes = prepare_volumes(cases, maps, PREP, cache, progress=False)
    assert dataset.cache_status(cases, maps, PREP, cache) == [True, True]
    assert np.array_equal(volumes[0].label, load_case(cases[0], PREP, maps[0]).label)


def test_cache_folder_must_be_writable(tmp_path):
    cases, maps = _two_cases(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot create the cache folder"):
        prepare_volumes(cases, maps, PREP, blocker / "cache", progress=False)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("ABDOMEN_VNET_CACHE", str(tmp_path / "c"))
    assert dataset.default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ABDOMEN_VNET_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert dataset.default_cache_dir() == tmp_path / "x" / "abdomen-vnet"
