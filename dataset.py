"""Datasets: finding image/label pairs in the public layouts, remapping their label maps to ours,
preprocessing to the training grid (with an on-disk cache), checking a dataset without training,
and sampling augmented patches.

    python dataset.py --check DIR_OR_DATALIST [--label-map NAME]

Volumes live in canonical RAS orientation at the training spacing: axis 0 runs from the
patient's left to right, axis 1 posterior to anterior, axis 2 inferior to superior.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from utils import (
    LABELS,
    LR_SWAP,
    NUM_CLASSES,
    Preprocessing,
    UserError,
    load_nifti,
    preprocess_image,
    preprocess_label,
    run_cli,
    spacing_of,
)

# ---------------------------------------------------------------------------------------------
# Label maps

# Source label value -> ours (0 background, 1 liver, 2 right kidney, 3 left kidney, 4 spleen).
# Values not listed are other organs and become background; a value outside `allowed` is an error.
LABEL_MAPS: dict[str, dict[int, int]] = {
    "identity": {0: 0, 1: 1, 2: 2, 3: 3, 4: 4},
    # FLARE22: 1 liver, 2 right kidney, 3 spleen, 13 left kidney; 4-12 other abdominal organs.
    "flare22": {1: 1, 2: 2, 3: 4, 13: 3},
    # BTCV (Multi-Atlas Labeling Beyond the Cranial Vault) and AMOS: 1 spleen, 2 right kidney,
    # 3 left kidney, 6 liver; 13 (BTCV) or 15 (AMOS) organs in all.
    "btcv": {1: 4, 2: 2, 3: 3, 6: 1},
    "amos": {1: 4, 2: 2, 3: 3, 6: 1},
    # WORD: 1 liver, 2 spleen, 3 left kidney, 4 right kidney; 16 organs.
    "word": {1: 1, 2: 4, 3: 3, 4: 2},
    # TotalSegmentator multilabel maps (v1: 104 classes, v2: 117; they agree on these): 1 spleen,
    # 2 right kidney, 3 left kidney, 5 liver.
    "totalseg": {1: 4, 2: 2, 3: 3, 5: 1},
    # Medical Segmentation Decathlon Task03_Liver (1 liver, 2 tumour: inside the liver) and Task09_Spleen.
    "msd_liver": {1: 1, 2: 1},
    "msd_spleen": {1: 4},
}
ALLOWED_VALUES: dict[str, set[int]] = {
    "identity": set(range(5)),
    "flare22": set(range(14)),
    "btcv": set(range(14)),
    "amos": set(range(16)),
    "word": set(range(17)),
    "totalseg": set(range(118)),
    "msd_liver": set(range(3)),
    "msd_spleen": set(range(2)),
}
LABEL_MAP_HELP = (f"source label map: auto (detected), one of {', '.join(LABEL_MAPS)}, SRC:OURS pairs "
                  f"such as '6:1,2:2,3:3,1:4,4-5:0,7-13:0' (ours: 1 liver, 2 right kidney, 3 left kidney, "
                  f"4 spleen; '*:0' lets any other value be background), or a .json file of such pairs")

# Our value for each name a label map may use as a target.
_TARGETS = {**{name: value for value, name in LABELS.items()}, "kidney_right": 2, "kidney_left": 3}


@dataclass
class LabelMap:
    """A parsed label map: mapping source value -> ours (unlisted values become background) and
    the source values allowed to occur (None: any)."""

    name: str
    mapping: dict[int, int]
    allowed: frozenset[int] | None

    def fingerprint(self) -> dict:
        return {"mapping": sorted(self.mapping.items()),
                "allowed": None if self.allowed is None else sorted(self.allowed)}


def _ranges(values: Iterable[int]) -> list[str]:
    """[1, 2, 3, 7] -> ["1-3", "7"]."""
    out: list[str] = []
    values = sorted(values)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(str(values[i]) if i == j else f"{values[i]}-{values[j]}")
        i = j + 1
    return out


def _pairs_to_map(pairs: list[tuple[str, object]], where: str) -> LabelMap:
    """SRC:OURS pairs (SRC an integer, a range 'a-b' or '*'; OURS 0..4 or an organ name) -> LabelMap."""
    mapping: dict[int, int] = {}
    allowed: set[int] | None = {0}
    for src, dst in pairs:
        src = str(src).strip()
        key = str(dst).strip().lower()
        if key.isdigit() and int(key) in LABELS:
            ours = int(key)
        elif key in _TARGETS:
            ours = _TARGETS[key]
        else:
            raise UserError(f"{where}: target {dst!r} for source {src!r} is not one of ours: 0 background, "
                            f"1 liver, 2 right_kidney, 3 left_kidney, 4 spleen")
        if src == "*":
            if ours:
                raise UserError(f"{where}: '*' may only map to 0 (every other value is background)")
            allowed = None
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", src)
        if not m or (m.group(2) and int(m.group(2)) < int(m.group(1))):
            raise UserError(f"{where}: source {src!r} is not a label value (e.g. 6) or range (e.g. 7-13)")
        for value in range(int(m.group(1)), int(m.group(2) or m.group(1)) + 1):
            # An organ given alone wins over a range sent to background ("6:1,4-13:0").
            if ours and mapping.get(value, ours) != ours:
                raise UserError(f"{where}: source value {value} is mapped twice ({mapping[value]} and {ours})")
            if ours:
                mapping[value] = ours
            if allowed is not None:
                allowed.add(value)
    if not mapping:
        raise UserError(f"{where}: the label map maps nothing to liver, kidneys or spleen")
    name = ",".join(f"{s}:{d}" for s, d in sorted(mapping.items()))
    if allowed is not None:
        zeros = _ranges(allowed - set(mapping) - {0})
        name += "".join(f",{z}:0" for z in zeros)
    else:
        name += ",*:0"
    return LabelMap(name, mapping, None if allowed is None else frozenset(allowed))


def parse_label_map(spec: str) -> LabelMap:
    """A label map from its name (LABEL_MAPS), SRC:OURS pairs ('6:1,2:2,3:3,1:4,4-5:0'), or a
    .json file holding such pairs as an object ({"6": 1, "2": "right_kidney", "7-13": 0})."""
    spec = str(spec).strip()
    if spec.lower() in LABEL_MAPS:
        key = spec.lower()
        return LabelMap(key, {s: d for s, d in LABEL_MAPS[key].items() if d}, frozenset(ALLOWED_VALUES[key] | {0}))
    if spec.lower().endswith(".json"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"{path}: no such label map file; pass a .json object of SRC: OURS pairs")
        try:
            obj = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: not valid JSON ({e}); write the label map as {{\"6\": 1, \"2\": 2}}") from None
        if not isinstance(obj, dict) or not obj:
            raise UserError(f"{path}: a label map file holds one JSON object of SRC: OURS pairs, e.g. {{\"6\": 1}}")
        return _pairs_to_map(list(obj.items()), str(path))
    if ":" in spec:
        pairs = []
        for part in spec.split(","):
            src, sep, dst = part.partition(":")
            if not sep:
                raise UserError(f"--label-map {spec!r}: {part!r} is not a SRC:OURS pair")
            pairs.append((src, dst))
        return _pairs_to_map(pairs, f"--label-map {spec!r}")
    raise UserError(f"unknown label map {spec!r}: choose from {sorted(LABEL_MAPS)}, give SRC:OURS pairs "
                    f"such as '6:1,2:2,3:3,1:4', or a .json file of pairs")


def _label_counts(label: np.ndarray, path: Path | str) -> np.ndarray:
    """Voxel count of each label value 0..max (int64). Non-integer or negative values raise a UserError.
    Counted one slab at a time, so no int64 copy of a whole volume is made."""
    counts = np.zeros(1, dtype=np.int64)
    for z in range(0, label.shape[-1], 16):
        chunk = np.asarray(label[..., z:z + 16])
        if np.issubdtype(chunk.dtype, np.floating):
            if not np.all(np.isfinite(chunk)) or not np.all(chunk == np.round(chunk)):
                raise UserError(f"{path}: label values are not whole numbers; is this an image rather than a label map?")
        if chunk.size and chunk.min() < 0:
            raise UserError(f"{path}: negative label values ({chunk.min():g}); a label map holds 0 and positive integers")
        c = np.bincount(chunk.reshape(-1).astype(np.int64, copy=False))
        if c.size > counts.size:
            c[:counts.size] += counts
            counts = c
        else:
            counts[:c.size] += c
    return counts


def remap_labels(label: np.ndarray, name: str, path: Path | str = "label") -> np.ndarray:
    """Source label map (X, Y, Z), any integer or whole-number dtype -> ours (uint8). name is a
    LABEL_MAPS name, SRC:OURS pairs or a .json file (parse_label_map). Values the map does not
    allow raise a UserError naming path."""
    lm = parse_label_map(name)
    counts = _label_counts(label, path)
    present = np.flatnonzero(counts)
    if lm.allowed is not None:
        unknown = sorted(int(v) for v in present if int(v) not in lm.allowed)
        if unknown:
            raise UserError(f"{path}: label values {unknown[:8]} are not in the {lm.name!r} label map "
                            f"(allowed {','.join(_ranges(lm.allowed))}); pass the right --label-map")
    lut = np.zeros(counts.size, dtype=np.uint8)
    for src, dst in lm.mapping.items():
        if src < lut.size:
            lut[src] = dst
    if label.dtype == bool:
        index = label.view(np.uint8)
    elif np.issubdtype(label.dtype, np.signedinteger):
        index = label.view(np.dtype(label.dtype.str.replace("i", "u")))  # checked non-negative: same values
    elif np.issubdtype(label.dtype, np.floating):
        index = label.astype(np.int32)  # checked whole numbers
    else:
        index = label
    return lut[index]


def _name_tokens(name: str) -> list[str]:
    """'RightKidney' / 'kidney_R' / 'Kidney (L)' -> lower-case word tokens."""
    return re.findall(r"[a-z]+", re.sub(r"([a-z])([A-Z])", r"\1 \2", str(name)).lower())


_RIGHT, _LEFT = {"right", "r", "rt"}, {"left", "l", "lt"}
# A kidney word with the side written into it: rkid, LKidney, kidneyr, rightkidney, renal.
_KIDNEY_WORD = re.compile(r"(right|left|rt|lt|r|l)?(kidneys?|kid|renal|ren)(right|left|rt|lt|r|l)?")
_LESION_WORDS = {"tumor", "tumour", "tumors", "tumours", "cancer", "lesion", "lesions", "metastasis", "metastases",
                 "cyst", "cysts", "mass", "masses", "nodule", "nodules", "carcinoma", "hcc"}
_VESSEL_WORDS = {"vein", "veins", "artery", "arteries", "vessel", "vessels"}
_FILLER_WORDS = {"the", "of", "and", "with", "in"}


def _kidney_side(value: int, name: str, tokens: list[str], where: str) -> int | None:
    """2 (right) or 3 (left) when the name is a kidney (or a kidney lesion), None when it is no
    kidney; a UserError when it looks like one ('kid', 'ren') but names no side, or both."""
    sides, kidney = set(), False
    for token in tokens:
        m = _KIDNEY_WORD.fullmatch(token)
        if m:
            kidney = True
            for part in (m.group(1), m.group(3)):
                if part:
                    sides.add(2 if part in _RIGHT else 3)
        elif "kid" in token or token.startswith("ren"):
            kidney = True  # a spelling we cannot read: refused below unless a side word places it
        elif token in _RIGHT:
            sides.add(2)
        elif token in _LEFT:
            sides.add(3)
    if not kidney or set(tokens) & _VESSEL_WORDS:  # renal vein, renal artery: vessels, not the kidney
        return None
    if len(sides) != 1:
        raise UserError(f"{where}: label {value} {name!r} looks like a kidney but does not say which kidney; "
                        f"pass --label-map with SRC:OURS pairs (2 right kidney, 3 left kidney)")
    return sides.pop()


def map_from_label_names(names: dict[int, str], where: str) -> str | None:
    """The label map that a dataset.json's label names describe ({value: name}): a LABEL_MAPS name
    when one matches exactly, else SRC:OURS pairs; None when no name is one of our organs.

    Kidneys are read in the common spellings (right kidney, kidney_R, RKidney, rkid, left renal).
    A lesion joins the organ of ours its name says (liver tumour -> liver); a lesion of another
    organ is background; a lesion naming no organ joins the liver only in a liver-only dataset.
    A UserError, suggesting --label-map, for a name that cannot be placed (a kidney without a side,
    a lesion of an unnamed organ, nnU-Net's "ignore" label) and for a dataset that names several
    organs but not all of ours: an organ of ours under a name not read here would train as background."""
    ours: dict[int, int] = {}
    organs: dict[int, str] = {}  # every organ named (not background, not a lesion)
    lesions = []
    for value, name in sorted(names.items()):
        tokens = _name_tokens(name)
        words = set(tokens)
        if value == 0 or tokens == ["background"]:
            ours[value] = 0
            continue
        if tokens == ["ignore"]:
            raise UserError(f"{where}: label {value} {name!r} is nnU-Net's ignore label (voxels left unannotated); "
                            f"training needs fully annotated labels: drop or complete those cases, or pass "
                            f"--label-map with SRC:OURS pairs if these voxels really are background")
        kidney = _kidney_side(value, name, tokens, where)
        if kidney is not None:
            ours[value] = kidney
        elif "liver" in words:
            ours[value] = 1
        elif "spleen" in words:
            ours[value] = 4
        elif words & _LESION_WORDS:
            if words - _LESION_WORDS - _FILLER_WORDS:
                ours[value] = 0  # a lesion of an organ not ours (pancreas tumour)
            else:
                lesions.append((value, name))
            continue
        else:
            ours[value] = 0
        if not words & _LESION_WORDS:
            organs[value] = name
    if lesions:
        if set(ours[v] for v in organs) != {1}:
            value, name = lesions[0]
            raise UserError(f"{where}: label {value} {name!r} does not name its organ; pass --label-map with "
                            f"SRC:OURS pairs")
        ours.update({value: 1 for value, _ in lesions})  # a liver dataset's tumours lie inside the liver
    found = {ours[v] for v in organs} - {0}
    if not found:
        return None
    missing = sorted(set(LABELS) - {0} - found)
    if missing and len(organs) > 1:
        unread = [f"{v} {organs[v]!r}" for v in organs if not ours[v]]
        raise UserError(f"{where}: the label names give {', '.join(LABELS[c] for c in sorted(found))} but no "
                        f"{', '.join(LABELS[c] for c in missing)}"
                        + (f" (unread names: {', '.join(unread[:6])}{', ...' if len(unread) > 6 else ''})" if unread else "")
                        + "; they would train as background: pass --label-map with SRC:OURS pairs, "
                          "e.g. '6:1,2:2,3:3,1:4,4-5:0,7-13:0'")
    values = set(ours) | {0}
    for key, mapping in LABEL_MAPS.items():
        if {s: d for s, d in mapping.items() if d} == {s: d for s, d in ours.items() if d} and \
                ALLOWED_VALUES[key] | {0} == values:
            return key
    return _pairs_to_map([(str(v), d) for v, d in ours.items()], where).name


def _names_from_dataset_json(meta: Path) -> dict[int, str] | None:
    """{value: name} from a dataset.json's "labels" (MSD: {"1": "liver"}; nnU-Net v2: {"liver": 1})."""
    try:
        obj = json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{meta}: not valid JSON ({e}); fix or remove it") from None
    labels = obj.get("labels") if isinstance(obj, dict) else None
    if not isinstance(labels, dict) or not labels:
        return None
    names: dict[int, str] = {}
    for k, v in labels.items():
        if str(k).strip().isdigit():
            names[int(k)] = str(v)
        elif isinstance(v, int) and not isinstance(v, bool):
            names[v] = str(k)
        else:
            raise UserError(f"{meta}: label {k!r}: {v!r} is neither value: name nor name: value (region-based "
                            f"labels are not supported); pass --label-map")
    return names


def label_map_from_filename(name: str) -> str | None:
    """The label map a public dataset's file naming implies (FLARE22_Tr_0001.nii.gz -> flare22)."""
    patterns = [(r"flare22_", "flare22"), (r"amos_\d+", "amos"), (r"word_\d+", "word"), (r"(img|label)\d+", "btcv"),
                (r"liver_\d+", "msd_liver"), (r"spleen_\d+", "msd_spleen")]
    for pattern, key in patterns:
        if re.match(pattern, name.lower()):
            return key
    return None


# ---------------------------------------------------------------------------------------------
# Finding the cases

LAYOUTS_HELP = ("imagesTr/ + labelsTr/ (nnU-Net, MSD, AMOS, WORD), images/ + labels/ (FLARE22), img/ + label/ "
                "(BTCV), sXXXX/ct.nii.gz + sXXXX/segmentations/ (TotalSegmentator), or a datalist .json "
                '({"training": [{"image": ..., "label": ...}]})')
# TotalSegmentator's per-organ masks (segmentations/<name>.nii.gz) that make up our label map.
TOTALSEG_ORGANS: dict[int, str] = {1: "liver", 2: "kidney_right", 3: "kidney_left", 4: "spleen"}
# Case file stems too generic to name a case (TotalSegmentator's ct.nii.gz): the folder names it.
_GENERIC_STEMS = {"ct", "image", "img", "imaging", "volume", "scan"}


@dataclass
class CasePaths:
    """One case: its CT, and its label map file or, for TotalSegmentator, its folder of per-organ
    masks (segmentations/). label_map, when set, is this case's source label map."""

    name: str
    image: Path
    label: Path | None
    label_map: str | None = None
    split: str = "training"  # or "validation": a datalist's "validation" entries, TotalSegmentator's meta.csv

    def sources(self) -> list[Path]:
        """Every file the case is read from."""
        if self.label is None:
            return [self.image]
        if self.label.is_dir():
            return [self.image, *organ_files(self.label).values()]
        return [self.image, self.label]


def organ_files(folder: Path) -> dict[int, Path]:
    """Our label value -> the TotalSegmentator mask file for it in folder (segmentations/)."""
    out = {}
    for value, organ in TOTALSEG_ORGANS.items():
        path = folder / f"{organ}.nii.gz"
        out[value] = folder / f"{organ}.nii" if not path.exists() and (folder / f"{organ}.nii").exists() else path
    return out


@dataclass
class Discovery:
    """What discover() found: the cases of one dataset and its source label map."""

    root: Path  # the dataset folder, or the datalist file
    layout: str  # nnunet, flare22, btcv, totalseg or datalist
    cases: list[CasePaths]
    label_map: str | None  # detected source label map; None when nothing tells
    label_map_source: str  # how it was detected, or why it could not be
    problems: list[str] = field(default_factory=list)  # pairing problems (collected when not strict)
    notes: list[str] = field(default_factory=list)  # cases left out on purpose, and why


def _nifti_stem(path: Path) -> str:
    return path.name.removesuffix(".gz").removesuffix(".nii")


def _nifti_files(folder: Path) -> list[Path]:
    """NIfTI files in folder, without hidden ones (the MSD archives carry macOS '._x.nii.gz' forks)."""
    try:
        return sorted(p for p in folder.iterdir()
                      if not p.name.startswith(".") and p.name.endswith((".nii.gz", ".nii")) and p.is_file())
    except OSError:
        return []


def _subdirs(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())
    except OSError:
        return []


def _is_totalseg_case(folder: Path) -> bool:
    return (folder / "ct.nii.gz").is_file() or (folder / "ct.nii").is_file()


def _match_layout(folder: Path) -> str | None:
    if (folder / "imagesTr").is_dir():
        return "nnunet"
    if (folder / "images").is_dir() and (folder / "labels").is_dir():
        return "flare22"
    if (folder / "img").is_dir() and (folder / "label").is_dir():
        return "btcv"
    if _is_totalseg_case(folder) or any(_is_totalseg_case(d) for d in _subdirs(folder)):
        return "totalseg"
    return None


def locate_datasets(root: Path, max_depth: int = 3) -> list[tuple[Path, str]]:
    """Dataset folders (and their layouts) at root, or else up to max_depth levels below it: a
    download unpacks to RawData/Training/img/ and the like."""
    layout = _match_layout(root)
    if layout:
        return [(root, layout)]
    found, frontier = [], [root]
    for _ in range(max_depth):
        deeper = []
        for folder in frontier:
            for sub in _subdirs(folder):
                layout = _match_layout(sub)
                if layout:
                    found.append((sub, layout))
                else:
                    deeper.append(sub)
        frontier = deeper[:1000]
    return found


def _case_name(image: Path) -> str:
    stem = _nifti_stem(image)
    if stem.lower() in _GENERIC_STEMS:
        return image.parent.name
    return stem.removesuffix("_0000")


def _pair_folder(images_dir: Path, labels_dir: Path, strict: bool, problems: list[str]) -> list[CasePaths]:
    """Pairs CASE_0000.nii.gz (nnU-Net), CASE.nii.gz (MSD, WORD, AMOS) or imgNNNN.nii.gz (BTCV) in
    images_dir with CASE.nii.gz or labelNNNN.nii.gz in labels_dir."""

    def problem(text: str) -> None:
        if strict:
            raise UserError(text)
        problems.append(text)

    images = _nifti_files(images_dir)
    labels = {_nifti_stem(p): p for p in _nifti_files(labels_dir)}
    stems = {_nifti_stem(p) for p in images}
    cases, used = [], set()
    for image in images:
        stem = _nifti_stem(image)
        # MSD-style names numbered from _0000 (spleen_0000, spleen_0001 with labels of the same
        # names) are cases, not channels: a label of the full stem says so.
        channel = None if stem in labels else re.fullmatch(r"(.+)_(\d{4})", stem)
        if channel and channel.group(2) != "0000" and f"{channel.group(1)}_0000" in stems:
            problem(f"{image}: a second image channel of case {channel.group(1)}; CT takes one channel per case: "
                    f"move the other channels out")
            continue
        base = channel.group(1) if channel and channel.group(2) == "0000" else stem
        candidates = [stem, base] + (["label" + stem[3:]] if stem.startswith("img") else [])
        label_stem = next((c for c in candidates if c in labels), None)
        if label_stem is None:
            if strict:
                expected = candidates[-1] if stem.startswith("img") else base
                raise UserError(f"{image}: no label {labels_dir / (expected + '.nii.gz')}; add it or remove the image")
            cases.append(CasePaths(base, image, None))  # check_case reports it
            continue
        used.add(label_stem)
        cases.append(CasePaths(base, image, labels[label_stem]))
    if not strict:
        problems.extend(f"{path}: a label without an image in {images_dir}" for s, path in labels.items() if s not in used)
    return cases


def _map_from_files(cases: list[CasePaths]) -> str | None:
    """The label map every case's file name implies, when they agree."""
    keys = set()
    for c in cases:
        keys.add(label_map_from_filename(c.image.name) or (label_map_from_filename(c.label.name) if c.label else None))
    return keys.pop() if len(keys) == 1 else None


def _detect(folder: Path, cases: list[CasePaths], layout_map: str | None = None, layout_name: str = ""
            ) -> tuple[str | None, str]:
    """(label map, how it was found): dataset.json label names, then the layout, then file names."""
    meta = folder / "dataset.json"
    if meta.is_file():
        names = _names_from_dataset_json(meta)
        if names:
            found = map_from_label_names(names, str(meta))
            if found is None:
                return None, f"{meta} names none of liver, kidneys, spleen"
            return found, f"label names in {meta.name}"
    if layout_map:
        return layout_map, f"the {layout_name} layout"
    found = _map_from_files(cases)
    if found:
        return found, "the file names"
    return None, "no dataset.json label names and no known file names"


def _discover_folder(folder: Path, layout: str, strict: bool) -> Discovery:
    problems: list[str] = []
    notes: list[str] = []
    dirs = {"nnunet": ("imagesTr", "labelsTr"), "flare22": ("images", "labels"), "btcv": ("img", "label")}[layout]
    images_dir, labels_dir = folder / dirs[0], folder / dirs[1]
    if not labels_dir.is_dir():
        text = f"{folder}: no {dirs[1]}/ folder beside {dirs[0]}/; the labels are needed for training"
        if strict:
            raise UserError(text)
        problems.append(text)
    cases = _pair_folder(images_dir, labels_dir, strict, problems)
    label_map, source = _detect(folder, cases, "btcv" if layout == "btcv" else None, "BTCV")
    if label_map == "amos":
        # AMOS mixes MRI (case ids 500 and up) into imagesTr: not CT, not in Hounsfield units.
        mri = [c for c in cases if (m := re.match(r"amos_(\d+)", c.name)) and int(m.group(1)) >= 500]
        if mri:
            cases = [c for c in cases if c not in mri]
            notes.append(f"left out {len(mri)} AMOS MRI cases (ids 500 and up: not CT)")
    return Discovery(folder, layout, cases, label_map, source, problems, notes)


def _totalseg_splits(root: Path) -> dict[str, str]:
    """image_id -> split (train, val, test) from a TotalSegmentator meta.csv (';'-separated)."""
    meta = root / "meta.csv"
    if not meta.is_file():
        return {}
    lines = meta.read_text(errors="replace").splitlines()
    if not lines:
        return {}
    delimiter = ";" if lines[0].count(";") >= lines[0].count(",") else ","
    return {row["image_id"].strip(): row["split"].strip().lower() for row in csv.DictReader(lines, delimiter=delimiter)
            if row.get("image_id") and row.get("split")}


def _discover_totalseg(root: Path, strict: bool) -> Discovery:
    """TotalSegmentator: sXXXX/ct.nii.gz with sXXXX/segmentations/<organ>.nii.gz (per-organ masks,
    combined into our map) or sXXXX/segmentation.nii.gz (a multilabel map); root may be one case."""
    folders = [root] if _is_totalseg_case(root) else [d for d in _subdirs(root) if _is_totalseg_case(d)]
    splits = _totalseg_splits(root)
    cases, problems, notes = [], [], []
    test = 0
    for folder in folders:
        split = splits.get(folder.name, "train")
        if split == "test":
            test += 1
            continue
        image = folder / "ct.nii.gz" if (folder / "ct.nii.gz").is_file() else folder / "ct.nii"
        seg_dir = folder / "segmentations"
        combined = next((p for p in (folder / "segmentation.nii.gz", folder / "segmentation.nii") if p.is_file()), None)
        if seg_dir.is_dir():
            case = CasePaths(folder.name, image, seg_dir, "identity")
        elif combined is not None:
            case = CasePaths(folder.name, image, combined)
        else:
            text = f"{folder}: no segmentations/ folder and no segmentation.nii.gz beside {image.name}"
            if strict:
                raise UserError(text)
            problems.append(text)
            case = CasePaths(folder.name, image, None)
        case.split = "validation" if split == "val" else "training"
        cases.append(case)
    if test:
        notes.append(f"left out {test} cases of TotalSegmentator's test split (meta.csv)")
    if any(c.label is not None and c.label.is_file() for c in cases):
        label_map, source = _detect(root, cases, "totalseg", "TotalSegmentator")
    else:
        label_map, source = "identity", "TotalSegmentator per-organ masks"
    return Discovery(root, "totalseg", cases, label_map, source, problems, notes)


def _resolve(base: Path, path: str) -> Path:
    return Path(os.path.normpath(base / Path(path).expanduser()))


def _datalist_map(spec: object, base: Path, where: str) -> str | None:
    """A datalist's "label_map" value, checked; a .json file in it is relative to the datalist."""
    if spec is None:
        return None
    spec = str(spec)
    if spec.lower().endswith(".json"):
        spec = str(_resolve(base, spec))
    try:
        parse_label_map(spec)
    except UserError as e:
        raise UserError(f"{where}: {e}") from None
    return spec


def _discover_datalist(path: Path, strict: bool) -> Discovery:
    """An MSD-style datalist: {"training": [{"image": ..., "label": ..., "label_map": ...}],
    "validation": [...], "label_map": ...}; paths relative to the file's folder. A label that is a
    folder holds TotalSegmentator per-organ masks."""
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); fix the datalist") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("training"), list):
        raise UserError(f'{path}: a datalist is a JSON object with a "training" list of '
                        f'{{"image": ..., "label": ...}} entries')
    problems: list[str] = []

    def problem(text: str) -> None:
        if strict:
            raise UserError(text)
        problems.append(text)

    base = path.parent
    cases = []
    for split in ("training", "validation"):
        entries = obj.get(split) or []
        if not isinstance(entries, list):
            raise UserError(f'{path}: "{split}" must be a list of {{"image": ..., "label": ...}} entries')
        for i, entry in enumerate(entries):
            where = f"{path}: {split}[{i}]"
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                problem(f'{where} needs an "image" path (one CT file)')
                continue
            image = _resolve(base, entry["image"])
            label = _resolve(base, entry["label"]) if isinstance(entry.get("label"), str) else None
            label_map = _datalist_map(entry.get("label_map"), base, where)
            if not image.exists():
                problem(f"{where}: image {image} does not exist")
            if label is None:
                problem(f'{where}: no "label" for {image}')
            elif not label.exists():
                problem(f"{where}: label {label} does not exist")
            elif label.is_dir():
                label_map = "identity"  # per-organ masks combine straight into our map
            name = str(entry.get("name") or _case_name(image))
            cases.append(CasePaths(name, image, label, label_map, split))
    if obj.get("label_map") is not None:
        found, source = _datalist_map(obj["label_map"], base, str(path)), f'"label_map" in {path.name}'
    elif isinstance(obj.get("labels"), dict):
        names = _names_from_dataset_json(path)
        found = map_from_label_names(names, str(path)) if names else None
        source = f"label names in {path.name}" if found else f"the label names in {path.name} name none of our organs"
    else:
        found = _map_from_files(cases)
        source = "the file names" if found else f'no "label_map" in {path.name} and no known file names'
    return Discovery(path, "datalist", cases, found, source, problems, [])


def discover(data: str | Path, strict: bool = True) -> Discovery:
    """The cases of the dataset at data: a folder in one of the layouts of LAYOUTS_HELP (or a folder
    holding exactly one such dataset up to three levels down), or a datalist .json. strict: a
    missing pair is a UserError; otherwise it is listed in problems and the case kept without label."""
    root = Path(data).expanduser()
    if not root.exists():
        raise UserError(f"{root}: no such file or folder; expected a dataset: {LAYOUTS_HELP}")
    if root.is_file():
        if not root.name.lower().endswith(".json"):
            raise UserError(f"{root}: not a dataset folder or a datalist .json; expected {LAYOUTS_HELP}")
        found = _discover_datalist(root, strict)
    else:
        located = locate_datasets(root)
        if not located:
            raise UserError(f"{root}: no dataset found; expected {LAYOUTS_HELP}")
        if len(located) > 1:
            listed = ", ".join(str(p) for p, _ in located[:5]) + (", ..." if len(located) > 5 else "")
            raise UserError(f"{root}: holds {len(located)} datasets ({listed}); pass --data with one of them")
        folder, layout = located[0]
        found = _discover_totalseg(folder, strict) if layout == "totalseg" else _discover_folder(folder, layout, strict)
    if strict and not found.cases:
        raise UserError(f"{found.root}: no cases found; expected {LAYOUTS_HELP}")
    seen: dict[str, int] = {}
    for case in found.cases:  # names key the cache and the report: make them unique
        n = seen.get(case.name, 0)
        seen[case.name] = n + 1
        if n:
            case.name = f"{case.name}-{n + 1}"
    return found


def find_cases(root: str | Path) -> list[CasePaths]:
    """Image/label pairs of the dataset at root (discover(root).cases); a missing pair is a UserError."""
    return discover(root).cases


def detect_label_map(root: str | Path) -> str:
    """The source label map of the dataset at root; a UserError when nothing tells it."""
    found = discover(root)
    if found.label_map is None:
        raise UserError(f"{found.root}: cannot tell the label map ({found.label_map_source}); pass --label-map")
    return found.label_map


def case_label_maps(found: Discovery, label_map: str = "auto") -> list[str]:
    """The source label map of each case: its own (datalist entry, TotalSegmentator masks), else
    label_map, else (auto) the detected one; as LABEL_MAPS names or canonical SRC:OURS pairs (a
    .json file's content), so a checkpoint that records them needs no file."""
    out = []
    for case in found.cases:
        name = case.label_map or (found.label_map if label_map == "auto" else label_map)
        if name is None:
            raise UserError(f"{found.root}: cannot tell the label map ({found.label_map_source}); pass --label-map: "
                            f"{LABEL_MAP_HELP}")
        out.append(parse_label_map(name).name)
    return out


# ---------------------------------------------------------------------------------------------
# Reading and preprocessing


def _grid_mismatch(image: Path, shape: tuple[int, ...], affine: np.ndarray, other: Path,
                   other_shape: tuple[int, ...], other_affine: np.ndarray, what: str = "label") -> str | None:
    """Why other (a label or mask) is not on image's voxel grid, or None. Affines may differ by
    1/20 voxel (float rounding in headers), measured at the grid's corners in mm."""
    if tuple(other_shape) != tuple(shape):
        return (f"{other}: {what} shape {tuple(other_shape)} differs from image shape {tuple(shape)} "
                f"({image.name}); they must be on one grid")
    corners = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)]).T
    diff = float(np.abs((np.asarray(affine) - np.asarray(other_affine)) @ corners)[:3].max())
    if diff > max(1e-3, 0.05 * float(spacing_of(affine).min())):
        return (f"{other}: {what} affine differs from the image's ({image.name}) by up to {diff:.3g} mm; "
                f"resample the {what} onto the image grid")
    return None


def read_label(case: CasePaths, shape: tuple[int, ...] | None = None, affine: np.ndarray | None = None) -> np.ndarray:
    """The case's label map (X, Y, Z) in source values, checked to lie on the image grid (shape,
    affine) when given. TotalSegmentator per-organ masks are combined into our values (uint8)."""
    if case.label is None:
        raise UserError(f"{case.image}: no label for this image; add one or remove the case")
    if not case.label.is_dir():
        label, label_affine = load_nifti(case.label, "label")
        if shape is not None and (why := _grid_mismatch(case.image, shape, affine, case.label, label.shape, label_affine)):
            raise UserError(why)
        return label
    out = None
    for value, path in organ_files(case.label).items():
        if not path.exists():
            raise UserError(f"{path}: missing; a TotalSegmentator case needs segmentations/<organ>.nii.gz for "
                            f"{', '.join(TOTALSEG_ORGANS.values())}")
        mask, mask_affine = load_nifti(path, "mask")
        if shape is None:
            shape, affine = mask.shape, mask_affine
        if why := _grid_mismatch(case.image, shape, affine, path, mask.shape, mask_affine, "mask"):
            raise UserError(why)
        if _label_counts(mask, path).size > 2:
            raise UserError(f"{path}: not a binary mask (values above 1); expected TotalSegmentator's 0/1 masks")
        if out is None:
            out = np.zeros(shape, dtype=np.uint8)
        out[np.asarray(mask) > 0] = value
    return out


def not_hu(lowest: float, path: Path | str) -> str | None:
    """Why an image whose lowest voxel is lowest is not a CT in Hounsfield units, or None. Every
    CT holds air or lung (-1000 to -500 HU); an MRI, or CT numbers stored without their rescale
    intercept (0..4095), has no voxel below -500, and clipping it to the HU window would train on noise."""
    if lowest > -500:
        return (f"{path}: no voxel below -500 HU (minimum {lowest:g}); not a CT in Hounsfield units: an MRI "
                f"(drop the case), or stored values without the rescale intercept (convert again applying the "
                f"DICOM rescale slope and intercept, usually HU = value - 1024)")
    return None


def read_case(case: CasePaths, label_map: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(CT (X, Y, Z) in HU as stored, affine (4, 4), label (X, Y, Z) uint8 in our values) on the
    case's own grid, with every check: 3D, finite, in HU (not_hu), label on the image grid, label
    values in the map."""
    hu, affine = load_nifti(case.image, "image")
    if np.issubdtype(hu.dtype, np.floating) and not np.all(np.isfinite(hu)):
        raise UserError(f"{case.image}: the image holds NaN or infinite voxels; fix or drop this case")
    if why := not_hu(float(hu.min()), case.image):
        raise UserError(why)
    label = read_label(case, hu.shape, affine)
    return hu, affine, remap_labels(label, label_map, case.label)


@dataclass
class Volume:
    """One preprocessed case: image (X, Y, Z) float32 in clipped HU and label (X, Y, Z) uint8, on
    the canonical training grid (cropped to the body); affine (4, 4) maps its voxels to world RAS mm.
    Arrays may be read-only memory maps of the cache."""

    name: str
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray | None = None


def load_case(case: CasePaths, prep: Preprocessing, label_map: str) -> Volume:
    """Reads, checks, reorients and resamples one pair to prep's grid (image linear, label linear on
    one-hot), clips to prep.clip and crops to the body."""
    hu, affine, label = read_case(case, label_map)
    image, info = preprocess_image(hu, affine, prep, normalize=False)
    del hu
    image = image.clamp_(*prep.clip).numpy()
    return body_volume(case.name, image, preprocess_label(label, info), info.affine_out, prep.clip)


def body_volume(name: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray, clip: tuple[float, float]
                ) -> Volume:
    """A Volume of image (X, Y, Z, HU already clipped to clip) and label cropped to body_box, its
    affine moved to the crop's first voxel."""
    box = body_box(image, label, clip[0] + 50.0)
    out_affine = np.array(affine, dtype=np.float64)
    out_affine[:3, 3] += out_affine[:3, :3] @ np.array([s.start or 0 for s in box], dtype=np.float64)
    return Volume(name, np.ascontiguousarray(image[box]), np.ascontiguousarray(label[box]), out_affine)


def body_box(image: np.ndarray, label: np.ndarray, hu: float, margin: int = 4
             ) -> tuple[slice, slice, slice]:
    """Bounding box of the body (voxels above hu, and all labels) plus a margin: the air around a
    patient carries no training signal and costs a third or more of every validation pass."""
    inside = (image > hu) | (label > 0)
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(inside.any(axis=other))
        if idx.size == 0:
            return (slice(None),) * 3
        box.append(slice(max(0, idx[0] - margin), min(image.shape[axis], idx[-1] + 1 + margin)))
    return tuple(box)


def intensity_stats(volumes: list[Volume], clip: tuple[float, float], max_voxels: int = 2_000_000
                    ) -> tuple[float, float]:
    """Mean and std (HU) of organ voxels after clipping, as nnU-Net normalises CT: the statistics
    of the tissue that matters, independent of how much air a field of view holds."""
    rng = np.random.default_rng(0)
    samples = []
    per_case = max(1, max_voxels // max(1, len(volumes)))
    for v in volumes:
        fg = v.image[v.label > 0]
        if fg.size > per_case:
            fg = rng.choice(fg, per_case, replace=False)
        samples.append(np.clip(fg, *clip))
    values = np.concatenate(samples) if samples else np.zeros(1)
    if values.size < 100:
        raise UserError("the training labels hold almost no organ voxels; check the label map (--label-map)")
    return float(values.mean()), float(max(values.std(), 1.0))


# ---------------------------------------------------------------------------------------------
# Preprocessing cache: load_case's output stored once per (settings, source files) as .npy files
# that epochs read through memory maps.

CACHE_VERSION = 1  # bump whenever load_case's output changes for the same inputs and settings
CACHE_ENV = "ABDOMEN_VNET_CACHE"


def default_cache_dir() -> Path:
    """$ABDOMEN_VNET_CACHE, else $XDG_CACHE_HOME/abdomen-vnet, else ~/.cache/abdomen-vnet: never
    beside the data, which may be read-only."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "abdomen-vnet"


def cache_entry(cache: Path, case: CasePaths, prep: Preprocessing, label_map: str) -> tuple[Path, dict]:
    """(entry folder, fingerprint) of a case: the fingerprint holds every setting load_case uses
    (orientation, spacing, clip, label map, code version) and each source file's path, size and
    modification time, and the folder name holds its hash, so other settings or a changed file
    give another entry and a stale one is never read."""
    sources = []
    for path in case.sources():
        try:
            st = path.stat()
        except OSError as e:
            raise UserError(f"{path}: cannot read it ({e.strerror}); check the path") from None
        sources.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    fingerprint = json.loads(json.dumps({
        "version": CACHE_VERSION, "orientation": prep.orientation, "spacing": [float(s) for s in prep.spacing],
        "clip": [float(c) for c in prep.clip], "label_map": parse_label_map(label_map).fingerprint(), "sources": sources,
    }))
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache) / f"{re.sub(r'[^A-Za-z0-9._-]', '_', case.name)[:80]}-{key}", fingerprint


def _entry_valid(entry: Path, fingerprint: dict) -> bool:
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("fingerprint") == fingerprint and (entry / "image.npy").is_file() and (entry / "label.npy").is_file()


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())


def build_cache_entry(case: CasePaths, prep: Preprocessing, label_map: str, entry: Path, fingerprint: dict) -> None:
    """Preprocesses case into entry: written in a temporary folder, then renamed, so an interrupted
    run leaves no half entry (and a concurrent run that finished first wins)."""
    volume = load_case(case, prep, label_map)
    tmp = entry.parent / f".tmp-{entry.name}-{os.getpid()}-{time.time_ns()}"
    tmp.mkdir(parents=True)
    try:
        _save_npy(tmp / "image.npy", volume.image)
        _save_npy(tmp / "label.npy", volume.label)
        meta = {"fingerprint": fingerprint, "name": case.name, "shape": list(volume.image.shape),
                "affine": volume.affine.tolist(), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if entry.exists() and not _entry_valid(entry, fingerprint):
            shutil.rmtree(entry, ignore_errors=True)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not _entry_valid(entry, fingerprint):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def open_cache_entry(entry: Path) -> Volume:
    """A cached Volume with read-only memory-mapped arrays: patches read only the pages they touch."""
    meta = json.loads((entry / "meta.json").read_text())
    image = np.load(entry / "image.npy", mmap_mode="r")
    label = np.load(entry / "label.npy", mmap_mode="r")
    if list(image.shape) != meta["shape"] or label.shape != image.shape:
        raise UserError(f"{entry}: damaged cache entry; delete it and run again")
    return Volume(meta["name"], image, label, np.array(meta["affine"], dtype=np.float64))


def cache_status(cases: list[CasePaths], label_maps: list[str], prep: Preprocessing, cache: Path) -> list[bool]:
    """Whether each case has a valid cache entry for these settings."""
    return [_entry_valid(*cache_entry(cache, c, prep, m)) for c, m in zip(cases, label_maps)]


def _prepare_cache(cache: Path) -> None:
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{cache}: cannot create the cache folder ({e.strerror}); pass --cache with a writable folder") from None
    if not os.access(cache, os.W_OK):
        raise UserError(f"{cache}: the cache folder is not writable; pass --cache with a writable folder")
    for tmp in cache.glob(".tmp-*"):  # left by an interrupted run
        try:
            if time.time() - tmp.stat().st_mtime > 3600:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _run_all(fn, arglists: list[tuple], workers: int, desc: str, progress: bool) -> list:
    """[fn(*args) for args in arglists], in up to `workers` processes, with a progress bar. The
    first failure cancels what has not started and is raised."""
    from concurrent.futures import as_completed
    from functools import partial

    from tqdm import tqdm

    results: list = [None] * len(arglists)
    # disable=None: the bar shows on a terminal only, so logs and error output stay clean.
    bar = partial(tqdm, total=len(arglists), desc=desc, unit="case", disable=None if progress else True)
    if workers <= 1 or len(arglists) <= 1:
        with bar() as b:
            for i, args in enumerate(arglists):
                results[i] = fn(*args)
                b.update()
        return results
    # Not forked from this process: a child forked after its parent ran a torch operation deadlocks
    # in torch's OpenMP pool (the phantom generator runs some before training). Workers fork from a
    # fresh server that has imported this module but run nothing: cheaper than spawning each.
    if "forkserver" in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
    else:
        context = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(workers, mp_context=context, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        futures = {pool.submit(fn, *args): i for i, args in enumerate(arglists)}
        with bar() as b:
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    b.update()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise
    return results


def prepare_volumes(cases: list[CasePaths], label_maps: list[str], prep: Preprocessing, cache: Path | None,
                    workers: int = 1, progress: bool = True) -> list[Volume]:
    """The preprocessed Volume of each case (load_case with its label map). With a cache folder,
    cases without a valid entry are preprocessed into it (in `workers` processes) and every volume
    is returned memory-mapped from it; without, all are preprocessed in memory."""
    if cache is None:
        return _run_all(load_case, [(c, prep, m) for c, m in zip(cases, label_maps)], workers, "preprocessing", progress)
    cache = Path(cache)
    _prepare_cache(cache)
    entries = [cache_entry(cache, c, prep, m) for c, m in zip(cases, label_maps)]
    todo = [(c, prep, m, e, fp) for c, m, (e, fp) in zip(cases, label_maps, entries) if not _entry_valid(e, fp)]
    if progress:
        print(f"cache {cache}: {len(cases) - len(todo)} of {len(cases)} cases ready"
              + (f", preprocessing {len(todo)}" if todo else ""), flush=True)
    if todo:
        _run_all(build_cache_entry, todo, workers, "preprocessing", progress)
    return [open_cache_entry(e) for e, _ in entries]


# ---------------------------------------------------------------------------------------------
# Checking a dataset


def _world_centroid_x(mask: np.ndarray, affine: np.ndarray) -> float | None:
    """World x (RAS mm: larger is the patient's right) of a mask's centroid; None when empty."""
    total = int(np.count_nonzero(mask))
    if not total:
        return None
    index = [float((mask.sum(axis=tuple(a for a in range(3) if a != axis)) * np.arange(mask.shape[axis])).sum()) / total
             for axis in range(3)]
    return float((np.asarray(affine) @ np.r_[index, 1.0])[0])


def check_case(case: CasePaths, label_map: str | None) -> tuple[str, list[str]]:
    """(one-line report, problems) for one case: shape, spacing, orientation, dtype, HU range, label
    values, organ volumes (mL) and the side of each paired organ. Keeps going past each problem."""
    import nibabel as nib

    parts, problems = [], []
    hu = affine = None
    try:
        hu, affine = load_nifti(case.image, "image")
    except UserError as e:
        problems.append(str(e))
    if hu is not None:
        parts.append(f"{'x'.join(str(n) for n in hu.shape)} {hu.dtype}, "
                     f"{'x'.join(f'{s:.2f}' for s in spacing_of(affine))} mm, {''.join(nib.aff2axcodes(affine))}")
        bad = int(np.count_nonzero(~np.isfinite(hu))) if np.issubdtype(hu.dtype, np.floating) else 0
        lo, hi = (float(np.nanmin(hu)), float(np.nanmax(hu))) if bad < hu.size else (math.nan, math.nan)
        parts.append(f"HU {lo:g}..{hi:g}")
        if bad:
            problems.append(f"{case.image}: {bad} NaN or infinite voxels")
        if why := not_hu(lo, case.image):
            problems.append(why)
    label = None
    try:
        label = read_label(case, hu.shape if hu is not None else None, affine)
    except UserError as e:
        problems.append(str(e))
    if label is not None:
        try:
            counts = _label_counts(label, case.label)
            parts.append(f"labels {{{','.join(_ranges(np.flatnonzero(counts[1:]) + 1))}}}")
            ours = remap_labels(label, label_map, case.label) if label_map else None
        except UserError as e:
            problems.append(str(e))
            ours = None
        if ours is not None and affine is not None:
            voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
            volumes = np.bincount(ours.reshape(-1), minlength=NUM_CLASSES) * voxel_ml
            organs = [f"{LABELS[c]} {volumes[c]:.1f} mL" for c in range(1, NUM_CLASSES) if volumes[c]]
            parts.append(", ".join(organs) if organs else "none of our organs")
            x = {c: _world_centroid_x(ours == c, affine) for c in range(1, NUM_CLASSES)}
            for right, left in ((2, 3), (1, 4)):
                if x[right] is not None and x[left] is not None and x[right] < x[left]:
                    problems.append(f"{case.label}: the {LABELS[right]} lies to the patient's left of the {LABELS[left]} "
                                    f"(world x {x[right]:.0f} < {x[left]:.0f} mm): wrong label map, or a flipped affine")
    return "; ".join(parts), problems


def _count(items: list, noun: str) -> str:
    return f"{len(items)} {noun}{'' if len(items) == 1 else 's'}"


def check_dataset(data: str | Path, label_map: str = "auto", out=print) -> int:
    """Reports every case of the dataset at data (check_case) and every problem found, with a
    summary line; returns the number of problems."""
    found = discover(data, strict=False)
    problems = list(found.problems)
    try:
        maps: list[str | None] = list(case_label_maps(found, label_map))
        names = ", ".join(dict.fromkeys(maps)) or "none"
        if label_map == "auto" or any(m != label_map for m in maps):
            own = found.cases and all(c.label_map for c in found.cases) and set(maps) != {found.label_map}
            source = "the cases' own entries" if own else found.label_map_source
        else:
            source = "--label-map"
        out(f"{found.root}: {found.layout} layout, {_count(found.cases, 'case')}, label map {names} (from {source})")
    except UserError as e:
        problems.append(str(e))
        maps = [None] * len(found.cases)
        out(f"{found.root}: {found.layout} layout, {_count(found.cases, 'case')}, label map unknown")
    for note in found.notes:
        out(f"  note: {note}")
    for p in problems:
        out(f"  problem: {p}")
    bad_cases = 0
    for case, name in zip(found.cases, maps):
        line, case_problems = check_case(case, name)
        out(f"{case.name}: {line}")
        for p in case_problems:
            out(f"  problem: {p}")
        bad_cases += bool(case_problems)
        problems += case_problems
    out(f"checked {_count(found.cases, 'case')}: {len(found.cases) - bad_cases} fine, {bad_cases} with problems; "
        f"{_count(problems, 'problem')} in all")
    return len(problems)


# ---------------------------------------------------------------------------------------------
# Patches and augmentation


@dataclass
class AugmentConfig:
    rotate_deg: float = 15.0  # max rotation about each axis
    rotate_prob: float = 0.5  # chance a patch is rotated
    scale: tuple[float, float] = (0.85, 1.15)  # isotropic zoom range
    scale_prob: float = 0.5
    # Mirroring is off by default: anatomy is not mirror-symmetric. The side of the liver is what
    # tells a right kidney from a left one, so a left-right mirror (labels swapped, as it must)
    # shows the network situs inversus and makes kidney side ambiguous. Set for symmetric tasks.
    flip_lr_prob: float = 0.0  # left-right mirror; swaps the kidney labels
    flip_ap_prob: float = 0.0  # anterior-posterior mirror
    flip_si_prob: float = 0.0  # superior-inferior mirror
    intensity_scale: tuple[float, float] = (0.9, 1.1)  # multiplies normalised intensities
    intensity_shift: float = 0.1  # max additive shift, in standard deviations
    intensity_prob: float = 0.5
    gamma: tuple[float, float] = (0.7, 1.5)
    gamma_prob: float = 0.3
    noise_std: float = 0.1  # max Gaussian noise std, in standard deviations
    noise_prob: float = 0.2
    enabled: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


def _rotation_matrix(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def spatial_matrix(rng: np.random.Generator, aug: AugmentConfig) -> tuple[np.ndarray, bool]:
    """3x3 map from output to input patch coordinates (array axis order), and whether it mirrors
    left-right (axis 0)."""
    m = np.eye(3)
    if aug.enabled and rng.random() < aug.rotate_prob:
        m = _rotation_matrix(np.radians(rng.uniform(-aug.rotate_deg, aug.rotate_deg, 3))) @ m
    if aug.enabled and rng.random() < aug.scale_prob:
        m = m * rng.uniform(*aug.scale)
    flips = np.ones(3)
    if aug.enabled:
        for axis, prob in enumerate((aug.flip_lr_prob, aug.flip_ap_prob, aug.flip_si_prob)):
            if rng.random() < prob:
                flips[axis] = -1
    return m @ np.diag(flips), bool(flips[0] < 0)


def warp_patch(image: torch.Tensor, label: torch.Tensor, matrix: np.ndarray, mirrored_lr: bool,
               out_size: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resamples a crop around its centre: image (C, X, Y, Z) float trilinear (border values
    outside), label (X, Y, Z) int nearest (background outside) -> (C, *out_size) float32 and
    out_size uint8. Output voxel o is taken from crop position (crop - 1) / 2 + matrix @ (o - (out - 1) / 2).
    A left-right mirror swaps the kidney labels, so labels keep naming the patient's side."""
    crop = tuple(image.shape[1:])
    m = torch.from_numpy(np.asarray(matrix, dtype=np.float32))
    axes = [torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in out_size]
    # Positions are affine in o: the (X, Y, 1) part is summed once, then one pass adds the Z part.
    # grid_sample wants normalised (-1..1, align_corners=False) coordinates in reversed axis order.
    norm = (m * torch.tensor([2.0 / c for c in crop])[:, None]).flip(0)
    grid = (axes[0][:, None, None, None] * norm[:, 0] + axes[1][None, :, None, None] * norm[:, 1]) \
        + axes[2][None, None, :, None] * norm[:, 2]
    img = F.grid_sample(image[None].float(), grid[None], mode="bilinear", padding_mode="border", align_corners=False)[0]
    # Nearest neighbour for the label by direct indexing: cheaper than a second grid_sample on a float copy.
    flat, inside, stride = None, None, 1
    for a in (2, 1, 0):
        pos = (axes[0][:, None, None] * m[a, 0] + axes[1][None, :, None] * m[a, 1] + (crop[a] - 1) / 2) \
            + axes[2][None, None, :] * m[a, 2]
        reach = float(sum(abs(float(m[a, j])) * (out_size[j] - 1) / 2 for j in range(3)))
        if reach > (crop[a] - 1) / 2:  # some positions fall outside the crop: they get background
            ok = (pos > -0.5) & (pos < crop[a] - 0.5)
            inside = ok if inside is None else inside.logical_and_(ok)
        idx = pos.round_().clamp_(0, crop[a] - 1).to(torch.int32)
        flat = idx if flat is None else flat.add_(idx.mul_(stride))
        stride *= crop[a]
    lab = label.reshape(-1)[flat].to(torch.uint8)
    if inside is not None:
        lab.mul_(inside)
    if mirrored_lr:
        lab = torch.from_numpy(LR_SWAP)[lab.long()]
    return img, lab


def augment_intensity(image: torch.Tensor, rng: np.random.Generator, aug: AugmentConfig) -> torch.Tensor:
    """Contrast and scanner variation on a normalised patch, in place: scale/shift, gamma, noise."""
    if not aug.enabled:
        return image
    if rng.random() < aug.intensity_prob:
        image.mul_(rng.uniform(*aug.intensity_scale)).add_(rng.uniform(-aug.intensity_shift, aug.intensity_shift))
    if rng.random() < aug.gamma_prob:
        lo, hi = image.aminmax()
        span = (hi - lo).clamp(min=1e-6)
        image.sub_(lo).div_(span).pow_(rng.uniform(*aug.gamma)).mul_(span).add_(lo)
    if rng.random() < aug.noise_prob:
        # Drawn on the patch's device (augment_batch): the same numbers as ever on a CPU.
        gen = torch.Generator(image.device).manual_seed(int(rng.integers(2**31)))
        image.add_(torch.randn(image.shape, generator=gen, device=image.device).mul_(rng.uniform(0, aug.noise_std)))
    return image


def crop_padded(array: np.ndarray, center: np.ndarray, size: tuple[int, int, int], fill: float) -> np.ndarray:
    """The size-shaped block of array centred at center (a new array, never a view of a memory
    map), filled with fill outside the array."""
    start = np.asarray(center) - np.asarray(size) // 2
    src, dst = [], []
    for s, n, length in zip(start, size, array.shape):
        a, b = max(int(s), 0), min(int(s) + n, length)
        if b <= a:
            return np.full(size, fill, dtype=array.dtype)
        src.append(slice(a, b))
        dst.append(slice(a - int(s), b - int(s)))
    if all(d.start == 0 and d.stop == n for d, n in zip(dst, size)):
        return np.array(array[tuple(src)])
    out = np.full(size, fill, dtype=array.dtype)
    out[tuple(dst)] = array[tuple(src)]
    return out


class PatchDataset(Dataset):
    """Random augmented patches from preprocessed volumes.

    Item i of epoch e depends only on (seed, e, i), so runs are reproducible with any number of
    DataLoader workers and a resumed run draws what an uninterrupted one would.
    Returns image (1, *patch) float32 (normalised) and label (*patch) uint8 (an eighth of int64's
    shared memory between loader processes; the training loop widens it on the device); with defer=True, the
    un-warped crop and the augmentation still to apply (augment_batch does it for a whole batch).
    """

    def __init__(self, volumes: list[Volume], prep: Preprocessing, patch_size: tuple[int, int, int],
                 samples_per_epoch: int, aug: AugmentConfig, seed: int = 0, foreground_prob: float = 0.67,
                 defer: bool = False):
        self.volumes = volumes
        self.prep = prep
        self.patch = tuple(int(p) for p in patch_size)
        self.samples = samples_per_epoch
        self.aug = aug
        self.seed = seed
        self.fg_prob = foreground_prob
        self.epoch = 0
        self.defer = defer
        rng = np.random.default_rng(seed)
        # Foreground oversampling: up to 20k voxel positions per organ per case to centre on, so
        # small organs (kidneys, spleen) are seen as often as the liver.
        self.organ_voxels: list[dict[int, np.ndarray]] = []
        for v in volumes:
            label = np.asarray(v.label)
            per = {}
            for c in range(1, NUM_CLASSES):
                idx = np.argwhere(label == c)
                if len(idx) > 20000:
                    idx = idx[rng.choice(len(idx), 20000, replace=False)]
                if len(idx):
                    per[c] = idx.astype(np.int32)
            self.organ_voxels.append(per)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.samples

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, i])
        k = int(rng.integers(len(self.volumes)))
        vol, organs = self.volumes[k], self.organ_voxels[k]
        if organs and rng.random() < self.fg_prob:
            cls = list(organs)[int(rng.integers(len(organs)))]
            center = organs[cls][int(rng.integers(len(organs[cls])))]
        else:
            center = np.array([rng.integers(0, s) for s in vol.image.shape])
        matrix, mirrored = spatial_matrix(rng, self.aug)
        warp = not np.allclose(matrix, np.eye(3))
        if not warp:
            crop = self.patch
        else:
            # Just large enough to hold the rotated, zoomed patch: its bounding box plus a voxel a side.
            reach = np.abs(matrix) @ np.array(self.patch, dtype=np.float64)
            crop = tuple(int(math.ceil(r)) + 2 for r in reach)
        img = crop_padded(vol.image, center, crop, self.prep.clip[0])
        lab = crop_padded(vol.label, center, crop, 0)
        if self.defer:  # augment_batch warps, normalises and augments a whole batch on the device
            return {"image": torch.from_numpy(img)[None], "label": torch.from_numpy(lab), "matrix": matrix,
                    "mirrored": mirrored, "rng": rng, "out_size": self.patch}
        image = torch.from_numpy(img.astype(np.float32, copy=False))[None]
        label = torch.from_numpy(lab)
        # Not `crop != patch`: a zoom-in can need a crop of exactly the patch size.
        if warp:
            image, label = warp_patch(image, label, matrix, mirrored, self.patch)
        # Normalising after the warp touches the patch, not the larger crop (both steps are linear).
        image = image.sub_(self.prep.mean).div_(self.prep.std)
        image = augment_intensity(image, rng, self.aug)
        return image.contiguous(), label


# ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Check a dataset without training: per case shape, spacing, orientation, "
                                "HU range, labels and organ volumes, and every problem found (exit code 1 if any).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--check", required=True, metavar="DATA", help=f"dataset folder or datalist: {LAYOUTS_HELP}")
    p.add_argument("--label-map", default="auto", help=LABEL_MAP_HELP)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    problems = check_dataset(args.check, args.label_map)
    if problems:
        raise SystemExit(1)
    return 0


if __name__ == "__main__":
    run_cli(main, parse_args())


# ---------------------------------------------------------------------------------------------
# Batched augmentation on the training device (train.py --gpu-augment)
#
# At 128^3 on a GPU the loader's per-patch work, dataset.warp_patch (an affine_grid and a
# grid_sample over the patch on a CPU core) and the intensity augmentation, can take longer than a
# training step. With PatchDataset(defer=True) a loader item is only the un-warped crop (HU) with
# the spatial matrix and the random generator it drew; collate_crops places a batch's crops of
# different sizes in one buffer, and augment_batch warps, normalises and intensity-augments the
# batch on the device: the per-patch math, one grid_sample for the batch
# (tests/test_gpu_augment.py compares the two on a CPU).


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
