"""Benchmark: training steps per second of our VNet (train.py's step) against MONAI's VNet with
MONAI's DiceCELoss, in one process, and whether the patch loader keeps up.

    python bench/bench_train.py                              # CUDA: 128^3, fp32 and bf16; CPU: 32^3, fp32 (+ bf16 on AMX)
    python bench/bench_train.py --device cpu --patch 48 --steps 4
    python bench/bench_train.py --device cuda --dtypes bf16 --compile

A step is what train.py does: forward (autocast for bf16), loss on float32 logits, backward,
optimiser step. Ours: build_vnet("vnet") with train.py's memory layout (train.to_training_layout:
channels-last activations, channels-last weights on CUDA only; on a CPU vnet.Conv3d's weight gradient
for small feature maps), losses.DiceCELoss, fused AdamW and gradient clipping. MONAI:
monai.networks.nets.VNet(out_channels=5) with its default dropout, monai.losses.DiceCELoss(
to_onehot_y=True, softmax=True) and torch's default AdamW, channels-last model and input (PyTorch's
recipe) or torch's default layout (monai-contiguous). Our preset with activation="elu" has exactly MONAI's 45.6 M
parameters (equal parameters); the default PReLU one is timed too.

The models take turns step by step (A B C A B C ..., each step timed alone; min and median over
--steps after --warmup; every step in the JSON), so load from other processes on the machine falls
on all of them alike; ratios are of medians, and against MONAI in each layout and in whichever is
faster for it here (there also the median of step-by-step ratios, firmer when the load drifts). Reported per model: the
median step split into forward+loss+backward and clipping+optimiser, steps/s, achieved TFLOP/s
(conv and transposed-conv multiply-adds counted with forward hooks, x2 for FLOPs, x3 for forward
plus backward), peak GPU memory (one separate step each). Loader: time for PatchDataset to make a
batch of --loader-patch patches from phantoms at --loader-spacing in one process, the per-patch
CPU path and the deferred path of --gpu-augment (crops only; the warp then runs on the device).
Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

from bench.benchutil import describe_machine, provenance  # noqa: E402
from utils import configure_torch, cpu_has_bf16_units, pick_device  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--patch", type=int, default=0, help="patch side, multiple of 16 (0: 128 on CUDA, 32 on CPU)")
    p.add_argument("--batch-size", type=int, default=2, help="patches per step")
    p.add_argument("--dtypes", default="", help="comma-separated fp32, bf16 ('': fp32,bf16 on CUDA and on a CPU with "
                   "AMX bf16 units, where train.py trains in bf16; fp32 on other CPUs, whose bf16 is emulated)")
    p.add_argument("--steps", type=int, default=0, help="timed steps per model (0: 20 on CUDA, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=0, help="untimed steps per model first (0: 5 on CUDA, 1 on CPU)")
    p.add_argument("--models", default="ours-elu,ours-prelu,monai,monai-contiguous",
                   help="comma-separated: ours-elu, ours-prelu, monai (channels-last), monai-contiguous")
    p.add_argument("--compile", action="store_true", help="torch.compile every model (default: off)")
    p.add_argument("--loader-patch", type=int, default=128, help="patch side for the loader timing (0: skip)")
    p.add_argument("--loader-spacing", type=float, default=1.5, help="phantom grid for the loader timing, mm")
    p.add_argument("--loader-batches", type=int, default=4, help="batches timed per loader path")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------
# Models and steps


def count_conv_flops(model: nn.Module, x: torch.Tensor) -> float:
    """Training FLOPs of one step on x: convolution and transposed-convolution multiply-adds of a
    forward pass (counted by hooks), x2 for FLOPs, x3 for forward plus backward."""
    macs = [0]

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        k = int(np.prod(module.kernel_size))
        if isinstance(module, nn.ConvTranspose3d):
            macs[0] += inputs[0].numel() * module.out_channels // module.groups * k
        else:
            macs[0] += output.numel() * module.in_channels // module.groups * k

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d))]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return 3 * 2 * float(macs[0])


@dataclass
class Contender:
    name: str
    model: nn.Module
    net: nn.Module  # what the step calls: the model, or its compiled form
    loss: nn.Module
    opt: torch.optim.Optimizer
    channels_last_input: bool
    clip: bool
    label_channel: bool  # MONAI's loss takes the label as (N, 1, ...)
    params: int
    flops: float = 0.0


def build(name: str, device: torch.device, compile_: bool) -> Contender:
    torch.manual_seed(0)
    if name.startswith("ours"):
        from losses import DiceCELoss
        from train import to_training_layout
        from vnet import build_vnet

        model = to_training_layout(build_vnet("vnet", activation=name.removeprefix("ours-")), device)
        loss, clip, label_channel = DiceCELoss(), True, False
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4, fused=True)
    else:
        from monai.losses import DiceCELoss
        from monai.networks.nets import VNet

        model = VNet(out_channels=5).to(device)
        if name == "monai":
            model = model.to(memory_format=torch.channels_last_3d)
        loss, clip, label_channel = DiceCELoss(to_onehot_y=True, softmax=True), False, True
        opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    net = torch.compile(model) if compile_ else model
    params = sum(p.numel() for p in model.parameters())
    return Contender(name, model, net, loss, opt, name != "monai-contiguous", clip, label_channel, params)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step(c: Contender, image: torch.Tensor, label: torch.Tensor, amp: torch.dtype | None,
         device: torch.device) -> tuple[float, float]:
    """One training step; (forward+loss+backward, clipping+optimiser) seconds."""
    sync(device)
    t0 = time.perf_counter()
    x = image.contiguous(memory_format=torch.channels_last_3d) if c.channels_last_input else image
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        logits = c.net(x)
    loss = c.loss(logits.float(), label[:, None] if c.label_channel else label)
    c.opt.zero_grad(set_to_none=True)
    loss.backward()
    sync(device)
    t1 = time.perf_counter()
    if c.clip:
        from train import clip_gradients

        clip_gradients(list(c.model.parameters()), 12.0)
    c.opt.step()
    sync(device)
    return t1 - t0, time.perf_counter() - t1


def time_models(contenders: list[Contender], shape: tuple[int, ...], amp: torch.dtype | None, device: torch.device,
                steps: int, warmup: int) -> dict[str, dict]:
    """Median step times, the models taking turns step by step."""
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(shape, generator=gen).to(device)
    label = torch.randint(0, 5, (shape[0], *shape[2:]), generator=gen).to(device)
    times: dict[str, list[tuple[float, float]]] = {c.name: [] for c in contenders}
    for i in range(warmup + steps):
        for c in contenders:
            t = step(c, image, label, amp, device)
            if i >= warmup:
                times[c.name].append(t)
    out = {}
    for c in contenders:
        fb = statistics.median(t[0] for t in times[c.name])
        steps_s = [t[0] + t[1] for t in times[c.name]]
        total = statistics.median(steps_s)
        out[c.name] = {"step_s": total, "step_min_s": min(steps_s), "step_all_s": steps_s, "fwd_bwd_s": fb,
                       "optimizer_s": statistics.median(t[1] for t in times[c.name]),
                       "steps_per_s": 1 / total, "tflops": c.flops / total / 1e12}
    if device.type == "cuda":
        for c in contenders:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            step(c, image, label, amp, device)
            out[c.name]["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


# ---------------------------------------------------------------------------------------------
# Loader


def time_loader(args: argparse.Namespace, device: torch.device) -> dict:
    """Seconds for PatchDataset to make one batch in one process (per-patch path and deferred
    path), and for dataset.augment_batch to finish a deferred batch on device."""
    from dataset import AugmentConfig, PatchDataset, Volume, augment_batch, collate_crops, intensity_stats
    from phantom import make_phantom
    from utils import Preprocessing

    prep = Preprocessing(spacing=(args.loader_spacing,) * 3)
    vols = []
    for seed in (1, 2):
        hu, label, _ = make_phantom(seed, spacing=prep.spacing)
        vols.append(Volume(str(seed), np.clip(hu, *prep.clip).astype(np.float32), label))
    prep.mean, prep.std = intensity_stats(vols, prep.clip)
    patch, n = (args.loader_patch,) * 3, args.batch_size
    aug = AugmentConfig()
    out = {"volume_shape": list(vols[0].image.shape)}
    for defer in (False, True):
        ds = PatchDataset(vols, prep, patch, 10_000, aug, seed=0, defer=defer)
        times, device_times = [], []
        for b in range(args.loader_batches):
            t = time.perf_counter()
            items = [ds[b * n + k] for k in range(n)]
            batch = collate_crops(items) if defer else torch.utils.data.default_collate(items)
            times.append(time.perf_counter() - t)
            if defer:
                sync(device)
                t = time.perf_counter()
                augment_batch(batch, prep, aug, device)
                sync(device)
                device_times.append(time.perf_counter() - t)
        out["deferred_batch_s" if defer else "batch_s"] = statistics.median(times)
        if defer:
            out["augment_batch_on_device_s"] = statistics.median(device_times)
    return out


# ---------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict:
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    configure_torch(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    patch = args.patch or (128 if cuda else 32)
    steps = args.steps or (20 if cuda else 5)
    warmup = args.warmup or (5 if cuda else 1)
    dtypes = [d.strip() for d in (args.dtypes or ("fp32,bf16" if cuda or cpu_has_bf16_units() else "fp32")).split(",")
              if d.strip()]
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    shape = (args.batch_size, 1, patch, patch, patch)
    prov = provenance(torch.get_num_threads())
    machine = torch.cuda.get_device_name(device) if cuda else prov["machine"]["cpu"]
    print(f"device {device} ({machine}); batch {args.batch_size} x {patch}^3; {warmup} warm-up + {steps} timed "
          f"steps per model, the models taking turns step by step{'; compiled' if args.compile else ''}")
    print(f"machine: {describe_machine(prov)}")

    contenders = [build(name, device, args.compile) for name in names]
    probe = torch.zeros(shape, device=device)
    for c in contenders:
        c.model.eval()
        c.flops = count_conv_flops(c.model, probe)
        c.model.train()
    results: dict = {"bench": "bench_train", **prov, "device": str(device), "device_name": machine, "patch": patch,
                     "batch": args.batch_size, "steps": steps, "warmup": warmup, "compile": args.compile,
                     "params": {c.name: c.params for c in contenders},
                     "train_gflop_per_step": {c.name: round(c.flops / 1e9, 1) for c in contenders}, "timings": {}}
    for dtype in dtypes:
        amp = {"fp32": None, "bf16": torch.bfloat16}[dtype]
        res = time_models(contenders, shape, amp, device, steps, warmup)
        results["timings"][dtype] = res
        print(f"\n{dtype}:")
        print(f"  {'model':<18}{'params':>9}{'step s':>9}{'min s':>9}{'fwd+bwd s':>11}{'optim s':>9}{'steps/s':>9}"
              f"{'TFLOP/s':>9}{'peak GiB':>10}   (step s: median)")
        for c in contenders:
            r = res[c.name]
            peak = f"{r['peak_gib']:.1f}" if "peak_gib" in r else "-"
            print(f"  {c.name:<18}{c.params / 1e6:>8.1f}M{r['step_s']:>9.3f}{r['step_min_s']:>9.3f}{r['fwd_bwd_s']:>11.3f}"
                  f"{r['optimizer_s']:>9.3f}{r['steps_per_s']:>9.2f}{r['tflops']:>9.3f}{peak:>10}")
    ratios = {}
    for dtype, res in results["timings"].items():
        for ours in ("ours-elu", "ours-prelu"):
            for theirs in ("monai", "monai-contiguous"):
                if ours in res and theirs in res:
                    ratios[f"{dtype} {ours}/{theirs}"] = {
                        "step_time": res[ours]["step_s"] / res[theirs]["step_s"],
                        "fwd_bwd_time": res[ours]["fwd_bwd_s"] / res[theirs]["fwd_bwd_s"]}
        monai_layouts = [m for m in ("monai", "monai-contiguous") if m in res]
        if monai_layouts:  # against MONAI in whichever layout is faster for it here
            best = min(monai_layouts, key=lambda m: res[m]["step_s"])
            for ours in ("ours-elu", "ours-prelu"):
                if ours in res:
                    pairs = [a / b for a, b in zip(res[ours]["step_all_s"], res[best]["step_all_s"])]
                    ratios[f"{dtype} {ours}/faster MONAI ({best})"] = {
                        "step_time": res[ours]["step_s"] / res[best]["step_s"],
                        "fwd_bwd_time": res[ours]["fwd_bwd_s"] / res[best]["fwd_bwd_s"],
                        "step_time_paired": statistics.median(pairs)}
    if "bf16" in results["timings"] and "fp32" in results["timings"]:
        fp32 = results["timings"]["fp32"]
        monai_fp32 = [m for m in ("monai", "monai-contiguous") if m in fp32]
        for ours in ("ours-elu", "ours-prelu"):
            if ours in results["timings"]["bf16"] and monai_fp32:
                # train.py's default where bf16 is native, against MONAI as its users run it (float32)
                best = min(monai_fp32, key=lambda m: fp32[m]["step_s"])
                ratios[f"bf16 {ours}/fp32 faster MONAI ({best})"] = {
                    "step_time": results["timings"]["bf16"][ours]["step_s"] / fp32[best]["step_s"]}
    results["ratios"] = ratios
    print("\nratios (time: below 1 is faster; speed-up: above 1 is faster):")
    for key, r in ratios.items():
        print(f"  {key:<52}" + "  ".join(f"{k} {v:.3f}" for k, v in r.items()))
    if "monai" in names and "monai-contiguous" in names:
        for dtype, res in results["timings"].items():
            gain = res["monai-contiguous"]["step_s"] / res["monai"]["step_s"]
            print(f"  {dtype}: channels-last alone makes MONAI's step {gain:.2f}x as fast as in the default layout")

    if args.loader_patch:
        loader = time_loader(args, device)
        results["loader"] = loader
        step_s = min(r["ours-elu"]["step_s"] for r in results["timings"].values()) if "ours-elu" in names else None
        workers = min(8, max(1, (os.cpu_count() or 1) - 1)) if cuda else 1
        print(f"\nloader: batch of {args.batch_size} x {args.loader_patch}^3 from phantoms at {args.loader_spacing} mm "
              f"({'x'.join(map(str, loader['volume_shape']))} voxels), one process:")
        print(f"  per-patch path (warp + intensity on the CPU)  {loader['batch_s']:.3f} s")
        print(f"  --gpu-augment path: crops {loader['deferred_batch_s']:.3f} s + augment_batch on {device} "
              f"{loader['augment_batch_on_device_s']:.3f} s")
        if step_s and args.loader_patch == patch:
            keeps = loader["batch_s"] / workers <= step_s
            print(f"  with {workers} worker(s): {loader['batch_s'] / workers:.3f} s a batch against a "
                  f"{step_s:.3f} s step: the loader {'keeps up' if keeps else 'is the bottleneck'}")
            loader["keeps_up_with_workers"] = {"workers": workers, "keeps_up": keeps}
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main(parse_args())
