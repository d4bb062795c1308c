"""Patch loading speed: augmented training patches per second on one CPU core, drawn from the
preprocessing cache (memory-mapped .npy) and from a volume preprocessed from the raw NIfTI, plus
what each source costs before the first patch.

    python bench/bench_loading.py                      # IRCAD patient 1 from ../shared/data/real
    python bench/bench_loading.py --image CT.nii.gz --label SEG.nii.gz --label-map flare22

Every augmentation is on for every patch (rotation, zoom, mirrors, intensity scale/shift, gamma,
noise), so the figure is a worst case. The sources take turns block by block (cache, raw, cache,
raw, ... --repeats blocks of --patches / --repeats patches each, after two warm-up draws), so load from
other processes falls on both alike; min and median per source. Prints one JSON line (every block,
the machine, the commit). Results: bench/RESULTS.md, "Loading".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchutil import describe_machine, provenance, summary  # noqa: E402
from dataset import AugmentConfig, CasePaths, PatchDataset, load_case  # noqa: E402
from utils import Preprocessing, run_cli  # noqa: E402

IRCAD = ROOT.parent / "shared" / "data" / "real" / "ircad_p1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--image", default=str(IRCAD / "image.nii.gz"), help="CT (NIfTI)")
    p.add_argument("--label", default=str(IRCAD / "label.nii.gz"), help="its label map (NIfTI)")
    p.add_argument("--label-map", default="identity", help="source label map (dataset.LABEL_MAPS or SRC:OURS pairs)")
    p.add_argument("--spacing", type=float, default=1.5, help="training grid, mm (train.py's CUDA default)")
    p.add_argument("--patch", type=int, default=128, help="patch side, voxels")
    p.add_argument("--patches", type=int, default=30, help="patches timed per source")
    p.add_argument("--repeats", type=int, default=5, help="blocks per source, the sources taking turns")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the figure is per core)")
    p.add_argument("--sources", default="cache,raw", help="comma-separated: cache, raw")
    return p.parse_args(argv)


def time_patches(dataset: PatchDataset, start: int, n: int) -> tuple[float, float]:
    """(patches per CPU second, patches per wall-clock second) over draws start .. start + n - 1.
    With one thread, CPU time is the per-core cost even when other processes share the cores."""
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(start, start + n):
        image, label = dataset[i]
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    assert image.shape[1:] == label.shape == dataset.patch
    return n / cpu, n / wall


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    case = CasePaths("bench", Path(args.image), Path(args.label))
    prep = Preprocessing(spacing=(args.spacing,) * 3, mean=100.0, std=60.0)
    aug = AugmentConfig(rotate_prob=1.0, scale_prob=1.0, flip_lr_prob=0.5, flip_ap_prob=0.5, flip_si_prob=0.5,
                        intensity_prob=1.0, gamma_prob=1.0, noise_prob=1.0)
    patch = (args.patch,) * 3
    prov = provenance(args.threads)
    print(f"machine: {describe_machine(prov)}")
    print(f"case {args.image}, spacing {args.spacing} mm, patch {args.patch}^3, all augmentations on every patch")
    sources = args.sources.split(",")
    block = max(1, args.patches // args.repeats)
    datasets, setups = {}, {}
    for source in sources:
        t0 = time.perf_counter()
        if source == "raw":
            volume = load_case(case, prep, args.label_map)
            setups[source] = {"preprocess_s": time.perf_counter() - t0}
        elif source == "cache":
            from dataset import prepare_volumes

            cache = Path(tempfile.mkdtemp(prefix="bench-cache-"))
            prepare_volumes([case], [args.label_map], prep, cache, progress=False)
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            volume = prepare_volumes([case], [args.label_map], prep, cache, progress=False)[0]
            setups[source] = {"cache_build_s": build, "open_s": time.perf_counter() - t0}
        else:
            raise SystemExit(f"unknown source {source!r}: use cache or raw")
        setups[source]["grid"] = list(volume.image.shape)
        datasets[source] = PatchDataset([volume], prep, patch, 2 + block * args.repeats, aug, seed=0)
        datasets[source][0], datasets[source][1]  # warm-up
    rates: dict[str, list[tuple[float, float]]] = {s: [] for s in sources}
    for r in range(args.repeats):
        for source in sources:
            rates[source].append(time_patches(datasets[source], 2 + r * block, block))
    result = {"bench": "bench_loading", **prov, "image": args.image, "spacing_mm": args.spacing, "patch": args.patch,
              "patches_per_block": block, "repeats": args.repeats, "sources": {}}
    for source in sources:
        per_cpu = summary([c for c, _ in rates[source]])
        per_wall = summary([w for _, w in rates[source]])
        result["sources"][source] = {**setups[source], "patches_per_cpu_s": per_cpu, "patches_per_wall_s": per_wall}
        setup = ", ".join(f"{k} {v:.2f}" for k, v in setups[source].items() if k != "grid")
        print(f"{source:5s}: grid {'x'.join(map(str, setups[source]['grid']))}, {setup}; median "
              f"{per_cpu['median']:.2f} patches/s per core (CPU time; min {per_cpu['min']:.2f}; "
              f"{per_wall['median']:.2f} per wall-clock second)")
    print(json.dumps(result))


if __name__ == "__main__":
    run_cli(main, parse_args())
