"""Train a VNet to segment liver, kidneys and spleen in abdominal CT.

    python train.py                      # data/ if it holds a dataset, else built-in phantoms
    python train.py --data DIR           # FLARE22, BTCV, AMOS, WORD, MSD, TotalSegmentator, nnU-Net folder
    python train.py --data LIST.json     # a datalist: {"training": [{"image": ..., "label": ...}]}
    python train.py --resume checkpoints/RUN
    python train.py --deterministic      # bit-for-bit reproducible, also across a kill and --resume

A run folder under checkpoints/ receives best.pt and last.pt (plain dicts, loadable with
torch.load(..., weights_only=True)), metrics.csv, metrics.json and curves.png, each written
atomically. A run killed at any moment (even mid-save) continues with --resume from the last
epoch that completed; with --deterministic it then ends with the weights an uninterrupted run
would have reached.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import (
    LABEL_MAP_HELP,
    LAYOUTS_HELP,
    AugmentConfig,
    PatchDataset,
    Volume,
    case_label_maps,
    default_cache_dir,
    discover,
    intensity_stats,
    locate_datasets,
    prepare_volumes,
)
from losses import DiceCELoss
from utils import (
    CHECKPOINT_FORMAT,
    LABELS,
    ORGANS,
    Preprocessing,
    UserError,
    check_writable_folder,
    configure_torch,
    dice_per_organ,
    load_checkpoint,
    pick_device,
    run_cli,
    save_checkpoint,
    sliding_window_inference,
)
from vnet import PRESETS, build_vnet, count_parameters


@dataclass
class TrainConfig:
    data: str = "data"  # dataset folder or datalist .json; "data" falls back to generated phantoms when it holds none
    out: str = "checkpoints"  # parent of the run folder
    run: str = ""  # run folder name; empty: a timestamp
    label_map: str = "auto"  # source label map (dataset.LABEL_MAPS, or SRC:OURS pairs); auto: detected
    cache: str = ""  # preprocessing cache folder; "": $ABDOMEN_VNET_CACHE or ~/.cache/abdomen-vnet; "off": none
    preset: str = ""  # VNet preset; empty: "vnet" on CUDA, "small" on CPU
    spacing: float = 0.0  # mm, isotropic training grid; 0: 1.5 on CUDA, 3.0 on CPU (4x fewer voxels)
    patch: int = 0  # patch side in voxels (multiple of 16); 0: 128 on CUDA, 48 on CPU
    batch_size: int = 2
    epochs: int = 0  # 0: 100 on CUDA, 40 on CPU
    steps_per_epoch: int = 0  # optimiser steps per epoch; 0: 250 on CUDA, 100 on CPU
    val_fraction: float = 0.2  # share of cases held out for validation (at least one)
    optimizer: str = "adamw"  # adamw or sgd (momentum 0.99, nesterov, as nnU-Net)
    lr: float = 0.0  # peak learning rate; 0: 2e-3 for adamw, 1e-2 for sgd
    weight_decay: float = 1e-4
    warmup_epochs: int = 1  # linear warm-up, then cosine decay to 1% of lr
    patience: int = 10  # early stopping: epochs without a better mean validation Dice
    seed: int = 0
    workers: int = -1  # DataLoader workers; -1: one per spare CPU core (max 8) on CUDA, 0 on CPU
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 with a scaler)
    synthetic_cases: int = 40  # phantoms generated when no dataset is found
    max_minutes: float = 0.0  # stop after this many minutes (0: none; CPU default 13)
    device: str = "auto"
    deterministic: bool = False  # deterministic algorithms only: same seed, same weights, even across --resume

    def resolve(self, device: torch.device) -> TrainConfig:
        """Fills the device-dependent defaults (fields left at 0 or empty)."""
        cuda = device.type == "cuda"
        c = TrainConfig(**asdict(self))
        c.preset = c.preset or ("vnet" if cuda else "small")
        c.patch = c.patch or (128 if cuda else 48)
        c.spacing = c.spacing or (1.5 if cuda else 3.0)
        c.epochs = c.epochs or (100 if cuda else 40)
        c.steps_per_epoch = c.steps_per_epoch or (250 if cuda else 100)
        c.lr = c.lr or (2e-3 if c.optimizer == "adamw" else 1e-2)
        if c.workers < 0:
            # On a CPU device the main process already uses every core for the convolutions; a
            # loader process would preempt its threads (oneDNN waits on the slowest one), so patches
            # are made in-process there (~50 ms against a >1 s step).
            c.workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if cuda else 0
        c.amp = c.amp and cuda
        return c


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a VNet for liver, kidneys and spleen in CT.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = TrainConfig()
    p.add_argument("--data", default=d.data, help=f"dataset folder or datalist: {LAYOUTS_HELP}; the default 'data' "
                   "falls back to built-in phantoms in data/synthetic/ when it holds no dataset")
    p.add_argument("--out", default=d.out, help="folder for run folders")
    p.add_argument("--run", default=d.run, help="run folder name (default: a timestamp)")
    p.add_argument("--label-map", default=d.label_map, help=LABEL_MAP_HELP)
    p.add_argument("--cache", default=d.cache, help="folder for preprocessed volumes, reused while settings and files "
                   "are unchanged ('': $ABDOMEN_VNET_CACHE or ~/.cache/abdomen-vnet; 'off': preprocess in memory)")
    p.add_argument("--preset", default=d.preset, choices=["", *PRESETS], help="VNet preset ('': vnet on CUDA, small on CPU)")
    p.add_argument("--spacing", type=float, default=d.spacing, help="training voxel size, mm (0: 1.5 on CUDA, 3.0 on CPU)")
    p.add_argument("--patch", type=int, default=d.patch, help="patch side in voxels, multiple of 16 (0: 128 CUDA, 48 CPU)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="patches per step")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs (0: 100 on CUDA, 40 on CPU)")
    p.add_argument("--steps-per-epoch", type=int, default=d.steps_per_epoch, help="steps per epoch (0: 250 CUDA, 100 CPU)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="share of cases for validation")
    p.add_argument("--optimizer", default=d.optimizer, choices=["adamw", "sgd"], help="optimiser")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (0: 2e-3 adamw, 1e-2 sgd)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs, help="linear warm-up epochs")
    p.add_argument("--patience", type=int, default=d.patience, help="early-stopping patience, epochs")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--workers", type=int, default=d.workers, help="loader workers (-1: spare cores up to 8 on CUDA, 0 on CPU)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="disable mixed precision on CUDA (default: on)")
    p.add_argument("--synthetic-cases", type=int, default=d.synthetic_cases, help="phantoms to generate when no data")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this many minutes, whole run (default: 13 on CPU with default settings, none on CUDA)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N")
    p.add_argument("--resume", default="", help="run folder or last.pt to continue (default: start a new run)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only, so a seed always gives the same weights, also across --resume "
                        "(slower on CUDA)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------


def resolve_data(cfg: TrainConfig) -> Path:
    """The dataset folder to train on; generates the phantom set when data/ holds none."""
    root = Path(cfg.data)
    if cfg.data != TrainConfig.data or (root.is_dir() and locate_datasets(root)):
        return root
    synthetic = root / "synthetic"
    print(f"{root}/ holds no dataset: generating {cfg.synthetic_cases} synthetic phantoms into {synthetic}/ (once)")
    from phantom import write_dataset

    write_dataset(synthetic, cfg.synthetic_cases, seed=cfg.seed, workers=max(1, min(4, os.cpu_count() or 1)))
    return synthetic


def load_volumes(data: Path, cfg: TrainConfig) -> tuple[list[Volume], list[Volume], Preprocessing, str]:
    found = discover(data)
    cases = found.cases
    if len(cases) < 2:
        raise UserError(f"{found.root}: {len(cases)} case found; training needs at least 2 (one for validation)")
    maps = case_label_maps(found, cfg.label_map)
    label_map = "+".join(dict.fromkeys(maps))
    for note in found.notes:
        print(f"note: {note}")
    prep = Preprocessing(spacing=(cfg.spacing,) * 3)
    cache = None if cfg.cache.lower() in ("off", "none") else Path(cfg.cache).expanduser() if cfg.cache else default_cache_dir()
    workers = max(1, min(4, os.cpu_count() or 1, len(cases)))
    volumes = prepare_volumes(cases, maps, prep, cache, workers)
    # A datalist's "validation" entries (or TotalSegmentator's val split) are the validation set; else a random share.
    val_idx = {i for i, c in enumerate(cases) if c.split == "validation"}
    if len(val_idx) == len(cases):
        raise UserError(f"{found.root}: every case is a validation case; training needs at least one training case")
    if not val_idx:
        order = np.random.default_rng(cfg.seed).permutation(len(volumes))
        val_idx = set(order[:max(1, int(round(len(volumes) * cfg.val_fraction)))].tolist())
    val = [v for i, v in enumerate(volumes) if i in val_idx]
    train = [v for i, v in enumerate(volumes) if i not in val_idx]
    prep.mean, prep.std = intensity_stats(train, prep.clip)
    return train, val, prep, label_map


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up, then cosine decay to 1% at the last step. It reads cfg.epochs at every step,
    so a run whose epochs are cut to fit --max-minutes still ends its schedule at its last step."""
    warm = cfg.warmup_epochs * cfg.steps_per_epoch

    def f(step: int) -> float:
        total = cfg.epochs * cfg.steps_per_epoch
        if step < warm:
            return (step + 1) / warm
        t = min(1.0, (step - warm) / max(1, total - warm))
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))

    return f


@torch.no_grad()
def validate(model: torch.nn.Module, volumes: list[Volume], prep: Preprocessing, cfg: TrainConfig,
             device: torch.device, amp_dtype: torch.dtype | None) -> dict[str, float]:
    """Per-organ Dice on whole validation volumes (sliding window on the training grid)."""
    model.eval()
    scores = {o: [] for o in ORGANS}
    for v in volumes:
        # Windows as large as the volume (up to three patches a side): fewer, bigger windows waste less
        # work on overlaps, and the network is fully convolutional.
        roi = tuple(min(-(-s // 16) * 16, 3 * cfg.patch) for s in v.image.shape)
        x = ((torch.from_numpy(np.array(v.image, dtype=np.float32)) - prep.mean) / prep.std)[None, None].to(device)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            probs = sliding_window_inference(x, roi, 4, model, overlap=0.25,
                                             pad_value=(prep.clip[0] - prep.mean) / prep.std)
        pred = probs[0].argmax(0).cpu()
        for organ, d in dice_per_organ(pred, torch.from_numpy(np.array(v.label))).items():
            scores[organ].append(d)
    model.train()
    out = {o: float(np.mean(s)) for o, s in scores.items()}
    out["mean"] = float(np.mean([out[o] for o in ORGANS]))
    return out


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train loss (Dice + CE)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss")
    ax1.legend()
    for organ in [*ORGANS, "mean"]:
        ax2.plot(epochs, [h[organ] for h in history], label=organ, lw=2.5 if organ == "mean" else 1.2)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation Dice")
    ax2.set_ylim(0, 1)
    ax2.legend(loc="lower right")
    fig.tight_layout()
    from utils import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def write_csv(history: list[dict], path: Path) -> None:
    from utils import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(history[0]))
            w.writeheader()
            w.writerows(history)

    atomic_write(path, write)


def find_resume(path: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such run folder or checkpoint; pass a run folder (or its last.pt) to --resume")
    ckpt = p / "last.pt" if p.is_dir() else p
    if not ckpt.exists():
        raise UserError(f"{ckpt}: no checkpoint to resume (the run stopped before its first epoch ended); "
                        f"delete {p} and start the run again")
    return ckpt


# ---------------------------------------------------------------------------------------------
# Crash safety and reproducibility


def check_new_run_dir(run_dir: Path) -> None:
    """Fails before any work when the run folder exists or cannot be created."""
    if run_dir.exists():
        raise UserError(f"{run_dir}: the run folder exists; continue it with --resume {run_dir}, "
                        f"or pass another --run")
    parent = run_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    check_writable_folder(parent, run_dir, "--out")


def resume_state(path: Path) -> dict:
    """The checkpoint to continue from: a full one (last.pt) with optimiser and scheduler."""
    state = load_checkpoint(path)
    missing = [k for k in ("optimizer", "scheduler", "train_config", "history", "epoch") if k not in state]
    if missing:
        raise UserError(f"{path}: holds no {', '.join(missing)} (a best.pt or a shipped model); resume from the run "
                        f"folder or its last.pt")
    return state


def remove_stale_temporaries(run_dir: Path) -> None:
    """Temporary files of saves a kill interrupted (utils.atomic_write names them .NAME.*.tmp*)."""
    for p in run_dir.glob(".*.tmp*"):
        p.unlink(missing_ok=True)


def repair_run_dir(run_dir: Path, state: dict, history: list[dict]) -> None:
    """Brings a killed run's folder back in line with the last.pt it resumes from: drops the
    temporary files of interrupted saves, writes best.pt again when last.pt is the best epoch but
    the kill came before best.pt was saved, and writes the metrics table and curves of its history."""
    remove_stale_temporaries(run_dir)
    best_path = run_dir / "best.pt"
    if state["best_epoch"] == state["epoch"]:
        try:
            stale = load_checkpoint(best_path).get("epoch") != state["epoch"]
        except UserError:
            stale = True
        if stale:
            resume_only = ("optimizer", "scheduler", "scaler", "threads")
            save_checkpoint({k: v for k, v in state.items() if k not in resume_only}, best_path)
    if history:
        write_csv(history, run_dir / "metrics.csv")
        plot_curves(history, run_dir / "curves.png")


def make_deterministic() -> None:
    """Deterministic algorithms only (an error for an operation that has none). cuBLAS needs its
    workspace fixed before its first use, cuDNN its autotuner off."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def seed_epoch(seed: int, epoch: int) -> None:
    """Seeds every generator from (seed, epoch) at the start of each epoch, so dropout and any other
    random draw of epoch e are the same whether the run got there uninterrupted or by --resume."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2)
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))


# ---------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict:
    t_start = time.time()
    resume = find_resume(args.resume) if args.resume else None
    state = resume_state(resume) if resume else None
    if state is not None:
        cfg = TrainConfig(**{k: v for k, v in state["train_config"].items() if k in {f.name for f in fields(TrainConfig)}})
        if args.epochs:
            cfg.epochs = args.epochs
        cfg.deterministic = cfg.deterministic or args.deterministic
        run_dir = resume.parent
        check_writable_folder(run_dir, resume, "--resume")
    else:
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "max_minutes"})
        run_dir = Path(cfg.out) / (cfg.run or time.strftime("%Y%m%d-%H%M%S"))
        check_new_run_dir(run_dir)
    device = pick_device(cfg.device)
    defaults = all(getattr(args, k) == getattr(TrainConfig, k) for k in ("epochs", "steps_per_epoch", "patch", "preset"))
    cfg.max_minutes = args.max_minutes if args.max_minutes is not None else (
        13.0 if device.type == "cpu" and defaults and state is None else 0.0)
    cfg = cfg.resolve(device)
    if cfg.patch % 16:
        raise UserError(f"--patch {cfg.patch}: must be a multiple of 16 (the VNet halves it four times)")
    if cfg.batch_size < 1 or cfg.steps_per_epoch < 1 or cfg.epochs < 1:
        raise UserError("--batch-size, --steps-per-epoch and --epochs must be at least 1")
    if cfg.batch_size * (cfg.patch // 16) ** 3 < 2 and PRESETS[cfg.preset].norm == "batch":
        raise UserError(f"--patch {cfg.patch} with --batch-size {cfg.batch_size}: the VNet's deepest stage holds one "
                        f"voxel, and batch norm needs two values; use --batch-size 2 or a larger --patch")
    configure_torch(device)
    if cfg.deterministic:
        make_deterministic()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    # Data
    data = resolve_data(cfg)
    train_vols, val_vols, prep, label_map = load_volumes(data, cfg)
    if state is not None:
        prep = Preprocessing.from_dict(state["preprocessing"])
    aug = AugmentConfig()
    patch = (cfg.patch,) * 3
    train_set = PatchDataset(train_vols, prep, patch, cfg.steps_per_epoch * cfg.batch_size, aug, cfg.seed)
    # Workers are not persistent: they hold a copy of train_set taken when they start, so only
    # workers started after set_epoch() draw that epoch's patches.
    loader = DataLoader(train_set, batch_size=cfg.batch_size, num_workers=cfg.workers,
                        pin_memory=device.type == "cuda", persistent_workers=False,
                        prefetch_factor=4 if cfg.workers > 0 else None)

    # Model, loss, optimiser, schedule
    # Channels-last 3D: oneDNN and cuDNN both run 3D convolutions faster in this layout.
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone, not on what ran before
    model = build_vnet(cfg.preset).to(device).to(memory_format=torch.channels_last_3d)
    loss_fn = DiceCELoss()
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                fused=device.type == "cuda")
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    amp_dtype = None
    if cfg.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    history: list[dict] = []
    best, best_epoch, start_epoch = -1.0, -1, 0
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        history = list(state["history"])
        best, best_epoch, start_epoch = state["best_metric"], state["best_epoch"], state["epoch"] + 1
        threads = state.get("threads", torch.get_num_threads())
        if cfg.deterministic and device.type == "cpu" and threads != torch.get_num_threads():
            # CPU reductions split work by thread: the same weights need the same thread count.
            print(f"note: {threads} CPU threads as in the interrupted run (here {torch.get_num_threads()} by default)")
            torch.set_num_threads(threads)
        print(f"resuming {run_dir} at epoch {start_epoch + 1}")
    else:
        run_dir.mkdir(parents=True, exist_ok=False)
    print(f"{len(train_vols)} training / {len(val_vols)} validation cases from {data} (labels: {label_map}); "
          f"VNet '{cfg.preset}' {count_parameters(model) / 1e6:.1f} M parameters on {device}; "
          f"patch {cfg.patch}^3 at {cfg.spacing} mm; run folder {run_dir}")

    def checkpoint(epoch: int, metrics: dict, full: bool) -> dict:
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "model_config": model.cfg.to_dict(),
            "preprocessing": prep.to_dict(),
            "labels": {str(k): v for k, v in LABELS.items()},
            "roi_size": [cfg.patch] * 3,
            "epoch": epoch,
            "metrics": metrics,
            "best_metric": best,
            "best_epoch": best_epoch,
            "train_config": asdict(cfg),
            "augmentation": aug.to_dict(),
            "label_map": label_map,
            "history": history,
        }
        if full:
            ckpt["optimizer"] = opt.state_dict()
            ckpt["scheduler"] = sched.state_dict()
            ckpt["scaler"] = scaler.state_dict()
            ckpt["threads"] = torch.get_num_threads()
        return ckpt

    if state is not None:
        repair_run_dir(run_dir, state, history)

    # Training loop
    stopped = "finished all epochs"
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        model.train()
        seed_epoch(cfg.seed, epoch)
        train_set.set_epoch(epoch)
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False)
        for image, label in bar:
            image = image.to(device, non_blocking=True).to(memory_format=torch.channels_last_3d)
            label = label.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = model(image)
            loss = loss_fn(logits.float(), label)
            if not torch.isfinite(loss):
                raise UserError(f"loss became {loss.item()} at epoch {epoch + 1}; lower --lr or check the data")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
            scaler.step(opt)
            scaler.update()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        metrics = validate(model, val_vols, prep, cfg, device, amp_dtype)
        row = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": float(np.mean(losses)),
               **{k: round(v, 4) for k, v in metrics.items()}, "seconds": round(time.time() - t0, 1)}
        history.append(row)
        improved = metrics["mean"] > best + 1e-4
        if improved:
            best, best_epoch = metrics["mean"], epoch
        # last.pt first: a kill between the two saves leaves a last.pt that names this epoch as the
        # best, from which --resume rewrites best.pt (repair_run_dir).
        save_checkpoint(checkpoint(epoch, metrics, full=True), run_dir / "last.pt")
        if improved:
            save_checkpoint(checkpoint(epoch, metrics, full=False), run_dir / "best.pt")
        write_csv(history, run_dir / "metrics.csv")
        plot_curves(history, run_dir / "curves.png")
        organs = "  ".join(f"{o} {metrics[o]:.3f}" for o in ORGANS)
        tqdm.write(f"epoch {epoch + 1:3d}  loss {row['train_loss']:.4f}  val Dice {organs}  mean {metrics['mean']:.3f}"
                   f"{'  *best' if improved else ''}  ({row['seconds']:.0f} s)")
        if epoch - best_epoch >= cfg.patience:
            stopped = f"early stop: no better mean Dice for {cfg.patience} epochs"
            break
        if cfg.max_minutes:
            # Fit the remaining epochs (and so the LR schedule) into the time budget.
            elapsed = (time.time() - t_start) / 60
            per_epoch = (time.time() - t0) / 60
            fits = epoch + 1 + int((cfg.max_minutes - elapsed) / per_epoch)
            if fits < cfg.epochs:
                cfg.epochs = max(fits, epoch + 1)
                tqdm.write(f"time budget {cfg.max_minutes:g} min: schedule shortened to {cfg.epochs} epochs")
            if epoch + 1 >= cfg.epochs:
                stopped = f"time budget of {cfg.max_minutes:g} min reached"
                break

    best_ckpt = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    final = {organ: round(best_ckpt["metrics"][organ], 4) for organ in [*ORGANS, "mean"]}
    summary = {**final, "best_epoch": best_ckpt["epoch"] + 1, "epochs_run": epoch + 1, "stopped": stopped,
               "minutes": round((time.time() - t_start) / 60, 2), "checkpoint": str(run_dir / "best.pt")}
    from utils import atomic_write

    atomic_write(run_dir / "metrics.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
    print(f"\n{stopped}. Best validation Dice (epoch {summary['best_epoch']}), {run_dir / 'best.pt'}:")
    print(f"  {'organ':<14}{'Dice':>8}")
    for organ in [*ORGANS, "mean"]:
        print(f"  {organ:<14}{final[organ]:>8.4f}")
    return summary


if __name__ == "__main__":
    run_cli(main, parse_args())
