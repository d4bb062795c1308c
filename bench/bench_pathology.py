"""Held-out atlas phantoms, one phenomenon at a time: checkpoints side by side on pathology and phases.

    python bench/bench_pathology.py --checkpoints checkpoints/phantom_small.pt,OTHER.pt \\
        --atlas ../shared/data/real/flare22_labels,../shared/data/real/btcv_labels --out /tmp/path

Each row makes --cases phantoms with atlas_phantom.make_atlas_phantom on a 2 mm grid (2.5 mm slice
profile), every phenomenon of atlas_phantom.PROBABILITIES off but the row's, in the row's contrast
phase. Seeds start at 10**9 + 1000 * (the row's place in ROWS, whichever --rows run): a training stream
draws its seeds uniformly from 2**32, so these are phantoms no run trained on, though their organ
shapes come from the same label maps. The
four organs are scored by Dice, and the row's own structure by what the model made of it:

  mass        share of the extra-organ mass (labelled background) painted as an organ, %
  excretory   share of the contrast-filled collecting system (labelled kidney) missed, %
  lesions     share of the lesions inside the organs (labelled organ) missed, %
  renal_mass  share of a real renal tumour's or cyst's part inside the kidney (labelled kidney) missed, %;
              the shapes are KiTS23's, so the row runs only with KiTS23 maps among --atlas

An organ with less than --min-ml in view (a sliver where the grid cuts it) is not scored. Every
checkpoint segments the same phantoms (infer.Segmenter: default inference, largest component
per organ). Prints a markdown table; writes OUT/pathology.json and OUT/pathology.md. Where a mass
row ran, a second table gives each mass: its volume, median HU, the organs it touches and what
each checkpoint painted it as (the share painted as organ hides which phantom carries it).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# name: (phase, phenomena forced on, the structure scored beyond the organs and how)
ROWS = {
    "portal": ("portal", (), None),
    "native": ("native", (), None),
    "excretory": ("excretory", (), "collecting"),
    "mass": ("portal", ("mass",), "mass"),
    "lesions": ("portal", ("liver_lesions", "kidney_lesions", "spleen_lesions"), "lesions"),
    "fatty_liver": ("portal", ("fatty_liver",), None),
    "ascites": ("portal", ("ascites",), None),
    "low_dose_metal": ("portal", ("low_dose", "metal"), None),
    # Last, so the rows above keep their seeds: the mass in an unenhanced scan, where the liver is
    # only 30-40 HU above a cyst (the real-CT mass row of bench_robustness.py fails there).
    "mass_native": ("native", ("mass",), "mass"),
    # After it for the same reason: a split-bolus CT urography, the kidneys enhancing as in the nephrographic
    # phase while excreted contrast fills their collecting systems.
    "excretory_split": ("excretory", ("split_bolus",), "collecting"),
    # The renal sinus open through the hilum, excreted contrast reaching the kidney's surface there.
    "excretory_hilum": ("excretory", ("open_hilum",), "collecting"),
    # A real renal tumour or cyst (a KiTS23 shape) on a kidney: its exophytic part background, the rest kidney.
    "renal_mass": ("portal", ("renal_mass",), "renal_mass"),
    # A lean patient's kidneys: a fat capsule 0-3 mm thick, bowel and muscle against them.
    "thin_perirenal": ("portal", ("thin_perirenal",), None),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoints", default=str(ROOT / "checkpoints" / "phantom_small.pt"),
                   help="checkpoints to score, comma-separated")
    p.add_argument("--atlas", default=str(ROOT.parent / "shared" / "data" / "real" / "flare22_labels"),
                   help="folders of label maps for the phantoms, comma-separated")
    p.add_argument("--rows", default=",".join(ROWS), help="rows, comma-separated")
    p.add_argument("--cases", type=int, default=4, help="phantoms per row")
    p.add_argument("--spacing", type=float, default=2.0, help="phantom grid, mm isotropic")
    p.add_argument("--min-ml", type=float, default=20.0,
                   help="an organ with less than this in view (mL) is not scored: a sliver at the grid's edge")
    p.add_argument("--out", default="", help="folder for the table (default: a new temporary one)")
    return p.parse_args(argv)


def structure_score(kind: str | None, pred: np.ndarray, label: np.ndarray, info: dict) -> float | None:
    """The row's own structure: % of the mass painted as organ, or % of the collecting system or
    lesions (labelled as their organ) or renal tumour inside the kidney missed; None where the row has none
    or none was painted."""
    if kind is None or not info[kind].any():
        return None
    where = info[kind] & (label > 0) if kind == "renal_mass" else info[kind]
    if not where.any():
        return None
    if kind == "mass":
        return 100.0 * float((pred[where] > 0).mean())
    return 100.0 * float((pred[where] != label[where]).mean())


def mass_detail(pred: np.ndarray, label: np.ndarray, hu: np.ndarray, mass: np.ndarray, spacing: float) -> dict:
    """One mass (bool mask) of a phantom: volume (mL), median HU, the share (%) of a 2-voxel shell
    around it on each organ of label, and the share (%) of it that pred paints as each organ."""
    from scipy import ndimage

    from utils import ORGANS

    shell = ndimage.binary_dilation(mass, iterations=2) & ~mass
    return {"ml": float(mass.sum()) * spacing ** 3 / 1000, "median_hu": float(np.median(hu[mass])),
            "touches": {o: 100.0 * float((label[shell] == k).mean()) for k, o in enumerate(ORGANS, start=1)},
            "painted_as": {o: 100.0 * float((pred[mass] == k).mean()) for k, o in enumerate(ORGANS, start=1)}}


def mass_table(results: list[dict]) -> str:
    """Markdown: one line per mass phantom, each checkpoint's share painted as organ and as which."""
    rows = [x for x in results if x["structure_kind"] == "mass"]
    if not rows:
        return ""
    short = {"liver": "liver", "right_kidney": "R kidney", "left_kidney": "L kidney", "spleen": "spleen"}
    names = list(dict.fromkeys(x["checkpoint"] for x in rows))
    lines = ["| row | phantom | mL | median HU | touches (% of its shell) | " + " | ".join(names) + " |",
             "|---|---|---|---|---|" + "---|" * len(names)]
    for row in dict.fromkeys(x["row"] for x in rows):
        per = {x["checkpoint"]: x["mass_detail"] for x in rows if x["row"] == row}
        for i, d in enumerate(per[names[0]]):
            touches = ", ".join(f"{short[o]} {v:.0f}" for o, v in d["touches"].items() if v >= 0.5) or "-"
            cells = []
            for n in names:
                painted = per[n][i]["painted_as"]
                parts = ", ".join(f"{short[o]} {v:.0f}" for o, v in painted.items() if v >= 0.5)
                cells.append(f"{sum(painted.values()):.1f} %" + (f" ({parts})" if parts else ""))
            lines.append(f"| {row} | {i} | {d['ml']:.0f} | {d['median_hu']:.0f} | {touches} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> dict:
    from atlas_phantom import PROBABILITIES, load_sources, make_atlas_phantom
    from infer import Segmenter
    from utils import ORGANS, dice_per_organ, label_counts

    checkpoints = [c for c in args.checkpoints.split(",") if c]
    atlases, shapes = load_sources(args.atlas)
    segmenters = {c: Segmenter(Path(c), torch.device("cpu")) for c in checkpoints}
    names = {c: Path(c).parent.name + "/" + Path(c).name if Path(c).name == "last.pt" else Path(c).name
             for c in checkpoints}
    start = time.perf_counter()
    results = []
    skipped = 0
    for row in args.rows.split(","):
        if row not in ROWS:
            sys.exit(f"error: --rows {row}: no such row; rows: {', '.join(ROWS)}")
        r = list(ROWS).index(row)  # a row's phantoms are the same whichever rows run with it
        phase, forced, kind = ROWS[row]
        if "renal_mass" in forced and not shapes:
            print(f"{row:15s} not run: it needs KiTS23 label maps (renal tumour shapes) among --atlas", flush=True)
            continue
        prob = {name: float(name in forced) for name in PROBABILITIES}
        per = {c: {"dice": {o: [] for o in ORGANS}, "structure": [], "mass_detail": []} for c in checkpoints}
        for i in range(args.cases):
            info: dict = {}
            hu, label, affine = make_atlas_phantom(10**9 + 1000 * r + i, atlases, (args.spacing,) * 3, 2.5,
                                                   lesions=shapes, prob=prob, phase=phase, info=info)
            # an organ the phantom lacks (a missing kidney), or a sliver of one at the grid's edge, is not scored:
            # the Dice of 15 mL of liver says nothing about the phenomenon
            counts = label_counts(label)
            volume_ml = {organ: float(counts[k]) * args.spacing ** 3 / 1000 for k, organ in enumerate(ORGANS, start=1)}
            present = {organ for organ, ml in volume_ml.items() if ml >= args.min_ml}
            skipped += sum(0 < ml < args.min_ml for ml in volume_ml.values())
            for c, seg in segmenters.items():
                pred = seg.segment(hu, affine)
                for organ, score in dice_per_organ(pred, label).items():
                    if organ in present:
                        per[c]["dice"][organ].append(score)
                score = structure_score(kind, pred, label, info)
                if score is not None:
                    per[c]["structure"].append(score)
                    if kind == "mass":
                        per[c]["mass_detail"].append(mass_detail(pred, label, hu, info["mass"], args.spacing))
        for c in checkpoints:
            d = per[c]["dice"]
            results.append({"row": row, "phase": phase, "forced": list(forced), "checkpoint": names[c],
                            "cases": args.cases, "structure_kind": kind,
                            "dice": {o: float(np.mean(v)) if v else None for o, v in d.items()},
                            "dice_cases": d, "structure": per[c]["structure"],
                            **({"mass_detail": per[c]["mass_detail"]} if kind == "mass" else {}),
                            "structure_mean": float(np.mean(per[c]["structure"])) if per[c]["structure"] else None})
            print(f"{row:15s} {names[c]:24s} " + " ".join(f"{v:.3f}" if v is not None else "-"
                                                          for v in results[-1]["dice"].values())
                  + (f"  {kind} {results[-1]['structure_mean']:.1f} %" if results[-1]["structure_mean"] is not None
                     else ""), flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    report = {"rows": results, "atlas": args.atlas, "spacing_mm": args.spacing, "cases": args.cases,
              "seconds": round(time.perf_counter() - start, 1),
              "min_ml": args.min_ml, "organs_skipped_as_slivers": skipped, "commit": commit.strip(),
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                         f"torch {torch.__version__}"}
    what = {"mass": "mass painted as organ", "collecting": "collecting system missed", "lesions": "lesions missed",
            "renal_mass": "renal tumour missed"}
    lines = ["| row | checkpoint | liver | right kidney | left kidney | spleen | own structure |",
             "|---|---|---|---|---|---|---|"]
    for x in results:
        own = f"{what[x['structure_kind']]} {x['structure_mean']:.1f} %" if x["structure_mean"] is not None else ""
        lines.append(f"| {x['row']} | {x['checkpoint']} | "
                     + " | ".join(f"{v:.3f}" if v is not None else "-" for v in x["dice"].values()) + f" | {own} |")
    table = "\n".join(lines)
    masses = mass_table(results)
    if masses:
        table += "\n\nMasses, phantom by phantom (% of each painted as organ, and as which):\n\n" + masses
    print(table)
    print(f"{skipped} organs with less than {args.min_ml:g} mL in view not scored")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_pathology_"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "pathology.json").write_text(json.dumps(report, indent=1))
    (out / "pathology.md").write_text(table + "\n")
    print(f"wrote {out / 'pathology.json'}")
    return report


if __name__ == "__main__":
    main(parse_args())
