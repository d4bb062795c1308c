"""Patch loading speed: augmented training patches per second on one CPU core, drawn from the
preprocessing cache (memory-mapped .npy) and from a volume preprocessed from the raw NIfTI, plus
what each source costs before the first patch.

    python bench/bench_loading.py                      # IRCAD patient 1 from ../shared/data/real
    python bench/bench_loading.py --image CT.nii.gz --label SEG.nii.gz --label-map flare22

Every augmentation is on for every patch (rotation, zoom, mirrors, intensity scale/shift, gamma,
noise), so the figure is a worst case. Results: bench/RESULTS.md, "Loading".
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: the figure is per core)")
    p.add_argument("--sources", default="cache,raw", help="comma-separated: cache, raw")
    return p.parse_args(argv)


def time_patches(dataset: PatchDataset, n: int) -> tuple[float, float]:
    """(patches per CPU second, patches per wall-clock second) over n patches after two warm-up
    draws. With one thread, CPU time is the per-core cost even when other processes share the cores."""
    dataset[0], dataset[1]
    cpu, wall = time.process_time(), time.perf_counter()
    for i in range(2, n + 2):
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
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}")
    print(f"case {args.image}, spacing {args.spacing} mm, patch {args.patch}^3, all augmentations on every patch")
    for source in args.sources.split(","):
        t0 = time.perf_counter()
        if source == "raw":
            volume = load_case(case, prep, args.label_map)
            setup = f"preprocessing from NIfTI {time.perf_counter() - t0:.1f} s"
        elif source == "cache":
            from dataset import prepare_volumes

            cache = Path(tempfile.mkdtemp(prefix="bench-cache-"))
            prepare_volumes([case], [args.label_map], prep, cache, progress=False)
            build = time.perf_counter() - t0
            t0 = time.perf_counter()
            volume = prepare_volumes([case], [args.label_map], prep, cache, progress=False)[0]
            setup = f"cache build {build:.1f} s (once), open {1000 * (time.perf_counter() - t0):.0f} ms"
        else:
            raise SystemExit(f"unknown source {source!r}: use cache or raw")
        dataset = PatchDataset([volume], prep, patch, args.patches + 2, aug, seed=0)
        per_cpu, per_wall = time_patches(dataset, args.patches)
        print(f"{source:5s}: grid {'x'.join(map(str, volume.image.shape))}, {setup}; "
              f"{per_cpu:.2f} patches/s per core (CPU time; {per_wall:.2f} per wall-clock second)")


if __name__ == "__main__":
    run_cli(main, parse_args())
