"""How infer.py's time and peak memory grow with the scan: one CT with its slices repeated to
512x512 x N (same anatomy over the same head-to-feet extent, thinner slices), segmented N by N.

    python bench/bench_scale.py                              # 100, 300, 700, 1000 slices of IRCAD patient 1
    python bench/bench_scale.py --slices 700 --repeats 3 --threads 2

Each scan is written as .nii.gz (int16, as the original) in a temporary folder, and each run is
`python infer.py --input SCAN --output MASK` (the shipped model, quick-look PNG on, as a user runs
it) in a fresh subprocess, so the peak resident memory (os.wait4) is that run's alone. "infer" is
infer.main's wall time (reading the scan to the PNG); "process" adds the interpreter's start and
imports. With --repeats, the sizes take turns (100 300 700 1000 100 ...), so load from other
processes falls on all of them alike. Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchutil import IRCAD_CT, describe_machine, parser, provenance, summary  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--image", default=str(IRCAD_CT), help="CT NIfTI whose slices are repeated")
    p.add_argument("--slices", default="100,300,700,1000", help="comma-separated slice counts")
    p.add_argument("--extent", type=float, default=210.0,
                   help="head-to-feet extent of every scan, mm (210: slices 0.3 mm apart at 700)")
    p.add_argument("--checkpoint", default="", help="checkpoint (default: infer.py's, the shipped model)")
    p.add_argument("--threads", type=int, default=0, help="infer.py --threads (0: infer.py's default, two per core)")
    p.add_argument("--repeats", type=int, default=1, help="runs per size, sizes interleaved")
    p.add_argument("--worker", nargs=2, metavar=("SCAN", "MASK"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_scan(source: Path, slices: int, extent_mm: float, path: Path) -> tuple[int, ...]:
    """Writes source's image with its last axis resampled to `slices` by nearest neighbour (each
    slice repeated), spacing extent_mm / slices along it, in the source's dtype and orientation."""
    import nibabel as nib
    import numpy as np

    img = nib.load(str(source))
    data = np.asanyarray(img.dataobj)
    n = data.shape[2]
    index = np.minimum(((np.arange(slices) + 0.5) * n / slices).astype(np.int64), n - 1)
    affine = img.affine.copy()
    affine[:3, 2] *= extent_mm / slices / np.linalg.norm(affine[:3, 2])
    out = nib.Nifti1Image(np.asfortranarray(data[:, :, index]), affine)
    out.set_qform(affine, code=1)
    out.set_sform(affine, code=1)
    nib.save(out, str(path))
    return out.shape


def run_worker(scan: str, mask: str, args: argparse.Namespace) -> dict:
    import infer

    argv = ["--input", scan, "--output", mask, "--threads", str(args.threads), "--overwrite", "--quiet"]
    if args.checkpoint:
        argv += ["--checkpoint", args.checkpoint]
    t0 = time.perf_counter()
    summary_ = infer.main(infer.parse_args(argv))
    (result,) = summary_["cases"].values()
    return {"infer_s": time.perf_counter() - t0, "steps": result["timings"]}


def run_one(scan: Path, mask: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(scan), str(mask),
           "--threads", str(args.threads)] + (["--checkpoint", args.checkpoint] if args.checkpoint else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"infer.py failed on {scan} (exit {os.waitstatus_to_exitcode(status)})")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t0
    result["peak_rss_gib"] = usage.ru_maxrss / 1024**2  # KiB on Linux
    result["cpu_s"] = usage.ru_utime + usage.ru_stime
    return result


def main(args: argparse.Namespace) -> dict:
    if args.worker:
        result = run_worker(*args.worker, args)
        print(json.dumps(result))
        return result
    from infer import default_threads

    threads = args.threads or default_threads()
    prov = provenance(threads)
    sizes = [int(s) for s in args.slices.split(",")]
    runs: dict[int, list[dict]] = {n: [] for n in sizes}
    shapes = {}
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        tmp = Path(tmp)
        for n in sizes:
            shapes[n] = make_scan(Path(args.image), n, args.extent, tmp / f"scan_{n}.nii.gz")
        for _ in range(args.repeats):
            for n in sizes:
                runs[n].append(run_one(tmp / f"scan_{n}.nii.gz", tmp / f"mask_{n}.nii.gz", args))
    rows = []
    for n in sizes:
        infer_s = summary([r["infer_s"] for r in runs[n]])
        median_run = sorted(runs[n], key=lambda r: r["infer_s"])[len(runs[n]) // 2]
        rows.append({"slices": n, "shape": list(shapes[n]), "spacing_z_mm": args.extent / n,
                     "megavoxels": float(shapes[n][0] * shapes[n][1] * n / 1e6), "infer_s": infer_s,
                     "process_s": summary([r["process_s"] for r in runs[n]]),
                     "cpu_s": summary([r["cpu_s"] for r in runs[n]]),
                     "peak_rss_gib": summary([r["peak_rss_gib"] for r in runs[n]]),
                     "steps_of_median_run": median_run["steps"]})
    print(f"{Path(args.image).name} slices repeated over {args.extent:g} mm; infer.py with "
          f"{args.checkpoint or 'the shipped model'}, {threads} thread(s), PNG on; {args.repeats} run(s) per size")
    print(f"machine: {describe_machine(prov)}")
    print("| slices | z spacing mm | Mvoxels | infer s (median) | min | process s | CPU s | peak RSS GiB | "
          "steps of the median run (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        steps = ", ".join(f"{k} {v:.1f}" for k, v in r["steps_of_median_run"].items() if k != "total")
        print(f"| {r['slices']} | {r['spacing_z_mm']:.2f} | {r['megavoxels']:.0f} | {r['infer_s']['median']:.1f} | "
              f"{r['infer_s']['min']:.1f} | {r['process_s']['median']:.1f} | {r['cpu_s']['median']:.1f} | "
              f"{r['peak_rss_gib']['median']:.2f} | "
              f"{steps} |")
    result = {"bench": "bench_scale", **prov, "image": str(args.image), "extent_mm": args.extent,
              "checkpoint": args.checkpoint or "shipped", "repeats": args.repeats, "rows": rows}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(parse_args())
