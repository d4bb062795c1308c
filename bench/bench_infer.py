"""Benchmark: our file-to-file inference (infer.py) against the same job done the MONAI way
(LoadImage, Orientation, Spacing, intensity scaling, sliding_window_inference, Invertd, SaveImage),
with the same model, window, overlap and window batch.

    python bench/bench_infer.py                              # IRCAD patient 1 at 1.5 mm, CPU, small preset
    python bench/bench_infer.py --repeats 9 --threads 2
    python bench/bench_infer.py --device cuda --synthetic 512,512,300 --preset vnet

Each run is a fresh subprocess, so its peak resident memory (os.wait4) is its own; imports are not
timed. The pipelines take turns: one untimed warm-up each (--warmup), then ours, MONAI, ours,
MONAI, ... (--repeats each), so load from other processes on the machine falls on both alike; the
figures are the min and median of each and the ratio of the medians (and the median of the
ratios of runs side by side, which holds better when the machine's load drifts). Both slide the same windows
over the same preprocessed grid: the output gives each side's window and window count, and says
when a window was clipped to the scan or when the counts differ. The model has random weights
unless --checkpoint is given (fine for timing); the masks of both pipelines are compared (Dice per
organ, voxel agreement). Post-processing is off in ours so both do the same job. Prints a table and
one JSON line (every repeat, the machine, the commit, the date). Both run on the same number of
threads (--threads; by default infer.py's own, two per core).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.benchutil import IRCAD_CT, describe_machine, parser, provenance, ratio_of_medians, summary  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--image", default=str(IRCAD_CT), help="CT NIfTI to segment")
    p.add_argument("--synthetic", default="", help="instead of --image, a phantom resampled to X,Y,Z voxels "
                   "(e.g. 512,512,300)")
    p.add_argument("--checkpoint", default="", help="trained checkpoint (default: random weights)")
    p.add_argument("--preset", default="small", help="VNet preset of the random model")
    p.add_argument("--spacing", type=float, default=1.5, help="grid of the random model, mm")
    p.add_argument("--window", type=int, default=160, help="window side, voxels of that grid (infer.py's default)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap")
    p.add_argument("--sw-batch", type=int, default=1, help="windows per network call")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, default=0, help="threads of both pipelines (0: infer.py's default)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each pipeline, interleaved")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each pipeline first")
    p.add_argument("--only", default="", choices=["", "ours", "monai"], help="run one pipeline only")
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Workers (one per subprocess)


def run_ours(args: argparse.Namespace) -> dict:
    import infer

    argv = ["--input", args.image, "--output", args.out, "--checkpoint", args.checkpoint, "--device", args.device,
            "--overlap", str(args.overlap), "--sw-batch", str(args.sw_batch), "--window", str(args.window),
            "--threads", str(args.threads), "--no-png", "--no-postprocess", "--overwrite", "--quiet"]
    parsed = infer.parse_args(argv)
    t0 = time.perf_counter()
    summary = infer.main(parsed)
    total = time.perf_counter() - t0
    (result,) = summary["cases"].values()
    return {"total_s": total, "sliding_window_s": result["timings"]["network"], "steps": result["timings"],
            **our_windows(args)}


def our_windows(args: argparse.Namespace) -> dict:
    """The preprocessed grid, window (infer.Segmenter.window_for) and window count of our run."""
    import nibabel as nib
    import numpy as np

    from utils import Preprocessing, load_checkpoint, to_grid, window_starts

    img = nib.load(args.image)
    prep = Preprocessing.from_dict(load_checkpoint(args.checkpoint)["preprocessing"])
    shape = to_grid(np.empty(img.shape, np.uint8), img.affine, prep).shape_out
    roi = [min(args.window, -(-s // 16) * 16) for s in shape]
    count = math.prod(len(window_starts(max(s, r), r, args.overlap)) for s, r in zip(shape, roi))
    return {"grid": list(shape), "roi": roi, "windows": count}


def run_monai(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (
        AsDiscreted,
        Compose,
        EnsureChannelFirstd,
        Invertd,
        LoadImaged,
        Orientationd,
        SaveImaged,
        ScaleIntensityRanged,
        Spacingd,
    )

    from utils import Preprocessing, load_checkpoint, mixed_precision_dtype, model_from_checkpoint

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    ckpt = load_checkpoint(args.checkpoint)
    model = model_from_checkpoint(ckpt, args.checkpoint).to(device)
    prep = Preprocessing.from_dict(ckpt["preprocessing"])
    lo, hi = prep.clip
    pre = Compose([
        LoadImaged(keys="image"),
        EnsureChannelFirstd(keys="image"),
        Orientationd(keys="image", axcodes=prep.orientation),
        Spacingd(keys="image", pixdim=prep.spacing, mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=(lo - prep.mean) / prep.std,
                             b_max=(hi - prep.mean) / prep.std, clip=True),
    ])
    data = pre({"image": args.image})
    t_pre = time.perf_counter()
    image = data["image"]
    roi = tuple(min(args.window, -(-s // 16) * 16) for s in image.shape[1:])
    # Like ours: infer.py's autocast dtype, and the sums kept on the model's device (stitching on the CPU
    # is only ours's out-of-memory fallback).
    amp_dtype = mixed_precision_dtype(device)

    def predictor(x):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return model(x).float().softmax(1)

    with torch.no_grad():
        pred = sliding_window_inference(image[None].to(device), roi, args.sw_batch, predictor, overlap=args.overlap,
                                        mode="gaussian", cval=(lo - prep.mean) / prep.std, device=device)
    t_sw = time.perf_counter()
    data["pred"] = pred[0]
    out_dir = Path(args.out).parent
    post = Compose([
        Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True),
        AsDiscreted(keys="pred", argmax=True),
        SaveImaged(keys="pred", output_dir=str(out_dir), output_postfix="monai", output_dtype=np.uint8,
                   separate_folder=False, resample=False, print_log=False),
    ])
    post(data)
    t_end = time.perf_counter()
    written = sorted(out_dir.glob("*_monai.nii*"))
    written[-1].rename(args.out)
    return {"total_s": t_end - t0, "sliding_window_s": t_sw - t_pre,
            "steps": {"load+preprocess": t_pre - t0, "network": t_sw - t_pre, "invert+save": t_end - t_sw},
            **monai_windows(tuple(image.shape[1:]), roi, args.overlap)}


def monai_windows(shape: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> dict:
    """MONAI's own count of the windows its sliding_window_inference slides (padding the image to
    the window where it is shorter, as it does)."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    padded = tuple(max(s, r) for s, r in zip(shape, roi))
    interval = _get_scan_interval(padded, roi, len(roi), (overlap,) * len(roi))
    return {"grid": list(shape), "roi": list(roi), "windows": len(dense_patch_slices(padded, roi, interval))}


# ---------------------------------------------------------------------------------------------
# Parent


def make_random_checkpoint(path: Path, preset: str, spacing: float, window: int) -> None:
    import torch

    from utils import CHECKPOINT_FORMAT, LABELS, Preprocessing
    from vnet import build_vnet

    torch.manual_seed(0)
    model = build_vnet(preset)
    prep = Preprocessing(spacing=(spacing,) * 3, mean=90.0, std=70.0)
    torch.save({"format": CHECKPOINT_FORMAT, "model": model.state_dict(), "model_config": model.cfg.to_dict(),
                "preprocessing": prep.to_dict(), "labels": {str(k): v for k, v in LABELS.items()},
                "roi_size": [window] * 3, "epoch": 0, "metrics": {}}, path)


def make_synthetic(path: Path, shape: tuple[int, int, int]) -> None:
    """A phantom resampled to shape over its field of view, written in LPS (int16)."""
    import numpy as np
    import torch

    from phantom import make_phantom, reorient_for_writing
    from utils import resample, save_nifti, spacing_of

    hu, label, affine = make_phantom(0, spacing=(2.0, 2.0, 2.0))
    extent = np.array(hu.shape) * spacing_of(affine)
    big = resample(torch.from_numpy(hu.astype(np.float32)), shape).round().to(torch.int16).numpy()
    new_affine = affine.copy()
    new_affine[:3, :3] = np.diag(extent / np.array(shape))
    big, _, new_affine = reorient_for_writing(big, np.zeros(shape, np.uint8), new_affine, "LPS")
    save_nifti(path, big, new_affine)


def run_worker(kind: str, args: argparse.Namespace, image: str, checkpoint: str, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--image", image, "--checkpoint",
           checkpoint, "--out", str(out), "--window", str(args.window), "--overlap", str(args.overlap),
           "--sw-batch", str(args.sw_batch), "--device", args.device, "--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{kind} pipeline failed (exit {proc.returncode})")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_gib"] = usage.ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux
    return result


def compare_masks(a_path: Path, b_path: Path) -> dict:
    import nibabel as nib
    import numpy as np

    from utils import ORGANS, dice_per_organ

    a, b = nib.load(str(a_path)), nib.load(str(b_path))
    same_grid = a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-4)
    if not same_grid:
        return {"same_grid": False}
    x, y = np.asarray(a.dataobj), np.asarray(b.dataobj)
    dice = dice_per_organ(x, y)
    present = [o for o in ORGANS if (x == ORGANS.index(o) + 1).any() or (y == ORGANS.index(o) + 1).any()]
    return {"same_grid": True, "voxel_agreement": float((x == y).mean()),
            "dice": {o: round(dice[o], 4) for o in present}}


def describe_windows(results: dict, window: int) -> list[str]:
    """Lines on the sliding-window geometry of each pipeline, with what differs called out."""
    lines = []
    for kind in ("ours", "monai"):
        if kind not in results:
            continue
        r = results[kind]
        clipped = [axis for axis, side in zip("xyz", r["roi"]) if side < window]
        note = f", clipped to the scan along {','.join(clipped)}" if clipped else ""
        lines.append(f"  {kind:<6} grid {'x'.join(map(str, r['grid']))}, window {'x'.join(map(str, r['roi']))}"
                     f"{note}: {r['windows']} windows")
    if len(lines) == 2 and results["ours"]["windows"] != results["monai"]["windows"]:
        lines.append("  WARNING: the pipelines slide different numbers of windows: the sliding-window ratio "
                     "compares unlike jobs")
    return lines


def main(args: argparse.Namespace) -> dict:
    if args.worker:
        result = run_ours(args) if args.worker == "ours" else run_monai(args)
        print(json.dumps(result))
        return result
    kinds = [k for k in ("ours", "monai") if not args.only or args.only == k]
    from infer import default_threads

    # Both pipelines on the same threads: MONAI on torch's default (one per core) beside ours on two per core
    # lost more to a busy neighbour than ours did, and the sliding-window ratio moved with the load.
    threads = args.threads = args.threads or default_threads()
    prov = provenance(threads)
    runs: dict[str, list[dict]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="bench_infer_") as tmp:
        tmp = Path(tmp)
        image = args.image
        if args.synthetic:
            shape = tuple(int(s) for s in args.synthetic.split(","))
            image = str(tmp / "synthetic.nii.gz")
            make_synthetic(Path(image), shape)
        checkpoint = args.checkpoint
        if not checkpoint:
            checkpoint = str(tmp / "random.pt")
            make_random_checkpoint(Path(checkpoint), args.preset, args.spacing, args.window)
        for kind in kinds:
            (tmp / kind).mkdir()
        for i in range(args.warmup + args.repeats):
            for kind in kinds:  # interleaved: A B A B ...
                r = run_worker(kind, args, image, checkpoint, tmp / kind / "mask.nii.gz")
                if i >= args.warmup:
                    runs[kind].append(r)
        masks = compare_masks(tmp / "ours" / "mask.nii.gz", tmp / "monai" / "mask.nii.gz") if len(kinds) == 2 else None
        import nibabel as nib

        shape = nib.load(image).shape
    results: dict = {"bench": "bench_infer", **prov,
                     "config": {"image": "synthetic" if args.synthetic else image, "shape": list(shape),
                                "device": args.device, "window": args.window, "overlap": args.overlap,
                                "sw_batch": args.sw_batch, "repeats": args.repeats, "warmup": args.warmup,
                                "checkpoint": args.checkpoint or f"random {args.preset}",
                                "threads_ours": threads}}
    for kind in kinds:
        last = runs[kind][-1]
        results[kind] = {"total_s": summary([r["total_s"] for r in runs[kind]]),
                         "sliding_window_s": summary([r["sliding_window_s"] for r in runs[kind]]),
                         "peak_rss_gib": summary([r["peak_rss_gib"] for r in runs[kind]]),
                         "steps": [r["steps"] for r in runs[kind]],
                         "grid": last["grid"], "roi": last["roi"], "windows": last["windows"]}
    print(f"image {results['config']['image']} {shape}; device {args.device}; threads {threads} each; window "
          f"{args.window}, overlap {args.overlap}, sw-batch {args.sw_batch}; checkpoint "
          f"{results['config']['checkpoint']}; {args.repeats} interleaved runs each after {args.warmup} warm-up")
    print(f"  machine: {describe_machine(prov)}")
    print("\n".join(describe_windows(results, args.window)))
    for kind in kinds:
        r = results[kind]
        print(f"  {kind:<6} end-to-end median {r['total_s']['median']:6.2f} s (min {r['total_s']['min']:6.2f})  "
              f"sliding window median {r['sliding_window_s']['median']:6.2f} s (min {r['sliding_window_s']['min']:6.2f})"
              f"  peak RSS {r['peak_rss_gib']['median']:.2f} GiB")
    if len(kinds) == 2:
        ours, monai = results["ours"], results["monai"]
        results["ratio_end_to_end"] = ratio_of_medians(ours["total_s"]["all"], monai["total_s"]["all"])
        results["ratio_sliding_window"] = ratio_of_medians(ours["sliding_window_s"]["all"],
                                                           monai["sliding_window_s"]["all"])
        for key in ("total_s", "sliding_window_s"):  # each run against the peer's run beside it
            pairs = [o[key] / m[key] for o, m in zip(runs["ours"], runs["monai"])]
            name = "end_to_end" if key == "total_s" else "sliding_window"
            results[f"ratio_{name}_paired"] = summary(pairs)
        results["masks"] = masks
        print(f"  ratio of medians ours/MONAI: end-to-end {results['ratio_end_to_end']:.2f}, "
              f"sliding window {results['ratio_sliding_window']:.2f}; median of the run-by-run ratios: "
              f"{results['ratio_end_to_end_paired']['median']:.2f}, "
              f"{results['ratio_sliding_window_paired']['median']:.2f} (firmer when the load drifts)")
        print(f"  masks: {masks}")
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main(parse_args())
