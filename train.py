"""Train a VNet to segment liver, kidneys and spleen in abdominal CT.

    python train.py                      # data/ if it holds a dataset, else built-in phantoms
    python train.py --data DIR           # FLARE22, BTCV, AMOS, WORD, MSD, TotalSegmentator, nnU-Net folder
    python train.py --data LIST.json     # a datalist: {"training": [{"image": ..., "label": ...}]}
    python train.py --stream 8 --phantom mixed --atlas FLARE22/labelsTr   # fresh phantoms every epoch
    python train.py --stream 8 --phantom mixed --atlas FLARE22/labelsTr,BTCV/labels   # two atlas sets
    python train.py --resume checkpoints/RUN
    python train.py --init checkpoints/phantom_small.pt --data DIR   # fine-tune a trained model
    python train.py --deterministic      # bit-for-bit reproducible, also across a kill and --resume
    python train.py --ensemble RUN_A RUN_B RUN_C --ensemble-out checkpoints/x.pt   # one checkpoint, three seeds
    torchrun --standalone --nproc_per_node=4 train.py ...   # four GPUs (see distributed.py)

A run folder under checkpoints/ receives best.pt and last.pt (plain dicts, loadable with
torch.load(..., weights_only=True)), metrics.csv, metrics.json and curves.png, each written
atomically. A run killed at any moment (even mid-save) continues with --resume from the last
epoch that completed (last.pt is saved before validating: an epoch whose validation died is
validated first); with --deterministic it then ends with the weights an uninterrupted run
would have reached.

--ensemble packs the final weights (last.pt) of several runs of one recipe (or given checkpoint
files) into one checkpoint, float16, without optimiser state: "members" (a list of state dicts)
in place of "model", "member_sources" (checkpoint, run, seed, epoch of each) and
"member_preprocessing"; infer.py averages the members' softmax probabilities.
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import inspect
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm import tqdm

import distributed
from atlas_phantom import parse_probabilities, phantom_volume
from dataset import (
    LABEL_MAP_HELP,
    LAYOUTS_HELP,
    AugmentConfig,
    PatchDataset,
    Volume,
    augment_batch,
    case_label_maps,
    collate_crops,
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
    WindowFallback,
    atomic_write,
    check_writable_folder,
    checkpoint_members,
    configure_torch,
    cudnn_autotune,
    dice_per_organ,
    load_checkpoint,
    mixed_precision_dtype,
    model_from_checkpoint,
    run_cli,
    save_checkpoint,
    sliding_window_inference,
)
from vnet import PRESETS, build_vnet, count_parameters

STREAM_VAL_CASES = 8  # fixed validation phantoms of a --stream run


@dataclass
class TrainConfig:
    data: str = "data"  # dataset folder or datalist .json; "data" falls back to generated phantoms when it holds none
    out: str = "checkpoints"  # parent of the run folder
    run: str = ""  # run folder name; empty: a timestamp
    label_map: str = "auto"  # source label map (dataset.LABEL_MAPS, or SRC:OURS pairs); auto: detected
    cache: str = ""  # preprocessing cache folder; "": $ABDOMEN_VNET_CACHE or ~/.cache/abdomen-vnet; "off": none
    preset: str = ""  # VNet preset; empty: "vnet" on CUDA, "small" on CPU
    spacing: float = 0.0  # mm, isotropic training grid; 0: 1.5 on CUDA, 5.0 on CPU (a 48^3 patch then spans 240 mm)
    patch: int = 0  # patch side in voxels (multiple of 16); 0: 128 on CUDA, 48 on CPU
    batch_size: int = 2
    epochs: int = 0  # 0: 100 on CUDA, 40 on CPU
    steps_per_epoch: int = 0  # optimiser steps per epoch; 0: 250 on CUDA, 150 on CPU
    val_fraction: float = 0.2  # share of cases held out for validation (at least one)
    optimizer: str = "adamw"  # adamw or sgd (momentum 0.99, nesterov, as nnU-Net)
    lr: float = 0.0  # peak learning rate; 0: 2e-3 for adamw, 1e-2 for sgd
    weight_decay: float = 1e-4
    warmup_epochs: int = 1  # linear warm-up, then cosine decay to 1% of lr
    patience: int = 10  # early stopping: epochs without a better mean validation Dice
    seed: int = 0
    workers: int = -1  # DataLoader workers; -1: one per spare CPU core (max 8) on CUDA, 0 on CPU
    amp: bool = True  # mixed precision: CUDA bf16 where native, else fp16 with a scaler; CPU bf16 on AMX only
    compile: bool = False  # torch.compile the training step's model (on a CPU it made steps slower)
    gpu_augment: bool = False  # warp and intensity augmentation batched on the device, not in the loader
    synthetic_cases: int = 40  # phantoms generated when no dataset is found
    stream: int = 0  # phantoms made fresh for every epoch, in memory on the training grid (0: train on --data)
    phantom: str = "procedural"  # generator of --stream: procedural, atlas or mixed (half each)
    atlas: str = ""  # folders (comma-separated) of label maps whose organ and lesion shapes --phantom atlas uses
    phantom_prob: str = ""  # "NAME=P,...": atlas phantoms' phenomenon and phase probabilities other than atlas_phantom's defaults
    init: str = ""  # checkpoint a new run starts from (fine-tuning): its weights, VNet and normalisation; new optimiser
    ema: float = 0.0  # decay of a per-step moving average of the weights that validation and checkpoints hold (0: off)
    max_minutes: float = 0.0  # stop after this many minutes (0: none; CPU default 13)
    device: str = "auto"
    deterministic: bool = False  # deterministic algorithms only: same seed, same weights, even across --resume

    def resolve(self, device: torch.device) -> TrainConfig:
        """Fills the device-dependent defaults (fields left at 0 or empty)."""
        cuda = device.type == "cuda"
        c = TrainConfig(**asdict(self))
        c.preset = c.preset or ("vnet" if cuda else "small")
        c.patch = c.patch or (128 if cuda else 48)
        # On a CPU the 13-minute budget allows ~1200 steps; at 5 mm a patch holds liver, kidneys, spleen and
        # spine together, and the kidneys' sides are learnt within it (bench/RESULTS.md: 0.78 at 3 mm, 0.88 at 5).
        c.spacing = c.spacing or (1.5 if cuda else 5.0)
        c.epochs = c.epochs or (100 if cuda else 40)
        c.steps_per_epoch = c.steps_per_epoch or (250 if cuda else 150)
        c.lr = c.lr or (2e-3 if c.optimizer == "adamw" else 1e-2)
        if c.workers < 0:
            # On a CPU device the main process already uses every core for the convolutions; a
            # loader process would preempt its threads (oneDNN waits on the slowest one), so patches
            # are made in-process there (~50 ms against a >1 s step).
            c.workers = min(8, max(0, (os.cpu_count() or 1) - 1)) if cuda else 0
        return c


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a VNet for liver, kidneys and spleen in CT.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = TrainConfig()
    p.add_argument("--data", default=d.data, help=f"dataset folder or datalist: {LAYOUTS_HELP}; the default 'data' "
                   "falls back to built-in phantoms in data/synthetic/ when it holds no dataset")
    p.add_argument("--out", default=d.out, help="folder for run folders")
    p.add_argument("--run", "--run-name", dest="run", default=d.run,
                   help="run folder name (default: a timestamp); under torchrun spell it --run-name, as torchrun "
                   "takes --run for its own --run-path")
    p.add_argument("--label-map", default=d.label_map, help=LABEL_MAP_HELP)
    p.add_argument("--cache", default=d.cache, help="folder for preprocessed volumes, reused while settings and files "
                   "are unchanged ('': $ABDOMEN_VNET_CACHE or ~/.cache/abdomen-vnet; 'off': preprocess in memory)")
    p.add_argument("--preset", default=d.preset, choices=["", *PRESETS], help="VNet preset ('': vnet on CUDA, small on CPU)")
    p.add_argument("--spacing", type=float, default=d.spacing, help="training voxel size, mm (0: 1.5 on CUDA, 5.0 on CPU)")
    p.add_argument("--patch", type=int, default=d.patch, help="patch side in voxels, multiple of 16 (0: 128 CUDA, 48 CPU)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="patches per step")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs (0: 100 on CUDA, 40 on CPU)")
    p.add_argument("--steps-per-epoch", type=int, default=d.steps_per_epoch, help="steps per epoch (0: 250 CUDA, 150 CPU)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="share of cases for validation")
    p.add_argument("--optimizer", default=d.optimizer, choices=["adamw", "sgd"], help="optimiser")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (0: 2e-3 adamw, 1e-2 sgd)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="weight decay")
    p.add_argument("--warmup-epochs", type=int, default=d.warmup_epochs, help="linear warm-up epochs")
    p.add_argument("--patience", type=int, default=d.patience, help="early-stopping patience, epochs")
    p.add_argument("--seed", type=int, default=d.seed, help="random seed")
    p.add_argument("--workers", type=int, default=d.workers, help="loader workers (-1: spare cores up to 8 on CUDA, 0 on CPU)")
    p.add_argument("--no-amp", dest="amp", action="store_false",
                   help="train in float32 (default: mixed precision on CUDA, and bf16 on a CPU with AMX bf16 units, "
                   "e.g. Xeon 4th generation and later, about 3x faster there; other CPUs train in float32)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for training "
                   "(minutes of compiling first; slower on CPUs)")
    p.add_argument("--gpu-augment", action="store_true", help="loader returns un-warped crops; the spatial warp and "
                   "intensity augmentation run batched on the training device (for when the loader "
                   "cannot keep up with the GPU)")
    p.add_argument("--synthetic-cases", type=int, default=d.synthetic_cases, help="phantoms to generate when no data")
    p.add_argument("--stream", type=int, default=d.stream, help="train on N phantoms made fresh for every epoch (in "
                   "memory, never written to disk; validation on 8 fixed ones) instead of --data (0: off)")
    p.add_argument("--phantom", default=d.phantom, choices=["procedural", "atlas", "mixed"],
                   help="--stream's generator: procedural organs (phantom.py), real organ shapes from --atlas label "
                   "maps (atlas_phantom.py), or mixed: half each")
    p.add_argument("--atlas", action="append", default=None, help="folder of label maps for --phantom atlas: FLARE22 "
                   "(labelsTr/) or BTCV 8-organ maps give organ shapes, KiTS23 maps (opt-in: CC BY-NC-SA, a model "
                   "trained on them is non-commercial) real renal tumour and cyst shapes; repeat it or separate "
                   "folders with commas")
    p.add_argument("--phantom-prob", default=d.phantom_prob, metavar="NAME=P,...",
                   help="atlas phantoms: probabilities of their phenomena and contrast phases other than "
                   "atlas_phantom.PROBABILITIES' and PHASE_PROBABILITIES' (e.g. mass=0.6,native=0.4: the phases not "
                   "named share the rest in their default proportions; default: none changed)")
    p.add_argument("--init", default=d.init, help="checkpoint to fine-tune: a new run starts from its weights, VNet "
                   "config, voxel size and intensity normalisation, with a fresh optimiser and schedule (default: "
                   "random weights)")
    p.add_argument("--ema", type=float, default=d.ema, help="keep an exponential moving average of the weights with this "
                   "decay per step (0.999 spans ~1000 steps); validation, best.pt and last.pt then hold the average "
                   "(default 0: off, the final weights)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop after this many minutes, whole run (default: 13 on CPU with default settings, none on CUDA)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda or cuda:N; with --resume, the interrupted run's "
                   "device unless given")
    p.add_argument("--resume", default="", help="run folder or last.pt to continue (default: start a new run)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only, so a seed always gives the same weights, also across --resume "
                        "(slower on CUDA)")
    p.add_argument("--ensemble", nargs="+", default=[], metavar="RUN",
                   help="instead of training, pack these run folders (their last.pt: final weights) or checkpoint "
                   "files, of one VNet config and grid (e.g. the seeds of one recipe), into --ensemble-out")
    p.add_argument("--ensemble-out", default="", help="the ensemble checkpoint to write (.pt; must not exist)")
    p.add_argument("--model-card", default="", help="with --ensemble: the model card's path (e.g. docs/MODEL_CARD.md), "
                   "recorded in the checkpoint's model_card field")
    args = p.parse_args(argv)
    args.atlas = ",".join(args.atlas or [])  # TrainConfig and checkpoints hold one comma-separated string
    try:
        parse_probabilities(args.phantom_prob)  # a typo fails here, not in the phantom worker an epoch later
    except UserError as e:
        p.error(str(e))
    return args


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


def cache_dir(cfg: TrainConfig) -> Path | None:
    """The preprocessing cache folder --cache names (None: 'off', preprocess in memory)."""
    if cfg.cache.lower() in ("off", "none"):
        return None
    return Path(cfg.cache).expanduser() if cfg.cache else default_cache_dir()


def load_volumes(data: Path, cfg: TrainConfig, d: distributed.Dist | None = None
                 ) -> tuple[list[Volume], list[Volume], Preprocessing, str]:
    """(training volumes, validation volumes, preprocessing with the training set's intensity
    statistics, label map name). Under torchrun (d), rank 0 prints notes and progress, and every
    rank preprocesses its share of the cases into the cache before all map every entry."""
    d = d or distributed.Dist()
    report = d.main
    found = discover(data)
    cases = found.cases
    if len(cases) < 2:
        raise UserError(f"{found.root}: {len(cases)} case found; training needs at least 2 (one for validation)")
    maps = case_label_maps(found, cfg.label_map)
    label_map = "+".join(dict.fromkeys(maps))
    if report:
        for note in found.notes:
            print(f"note: {note}")
    prep = Preprocessing(spacing=(cfg.spacing,) * 3)
    workers = max(1, min(4, os.cpu_count() or 1, len(cases)))
    cache = cache_dir(cfg)
    if d.enabled and cache is not None:
        # Entries are written atomically, so ranks fill disjoint shares side by side; they then wait
        # for each other on a long gloo timeout (rank 0 alone building a large dataset outlasted
        # NCCL's watchdog while the others waited in a collective).
        d.every_rank(lambda: prepare_volumes(cases[d.rank::d.world], maps[d.rank::d.world], prep, cache,
                                             max(1, workers // d.local_world), progress=report))
    volumes = prepare_volumes(cases, maps, prep, cache, workers, progress=report)
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
             device: torch.device, amp_dtype: torch.dtype | None, windows: WindowFallback | None = None
             ) -> dict[str, float]:
    """Per-organ Dice on whole validation volumes, on the training grid (sliding window): training-grid
    Dice, not the scans' own grid's (infer.py --label scores that); resampling a perfect mask
    from a 5 mm grid alone costs the kidneys about 0.05 on the scan's grid. Out of GPU memory, fewer
    windows per call, then the sums kept on the CPU (windows: those settings, which stay lighter for
    later calls; default 4 windows per call)."""
    windows = windows or WindowFallback(4, device)
    model.eval()
    scores = {o: [] for o in ORGANS}

    def probabilities(x: torch.Tensor, roi: tuple[int, ...]) -> torch.Tensor:
        # No cuDNN autotuning: the windows change shape with the volume, and each new shape would be timed.
        with cudnn_autotune(False), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            return sliding_window_inference(x, roi, windows.sw_batch, model, overlap=0.25,
                                            pad_value=(prep.clip[0] - prep.mean) / prep.std,
                                            out_device=windows.out_device)

    for v in volumes:
        # Windows as large as the volume (up to three patches a side): fewer, bigger windows waste less
        # work on overlaps, and the network is fully convolutional.
        roi = tuple(min(-(-s // 16) * 16, 3 * cfg.patch) for s in v.image.shape)
        x = ((torch.from_numpy(np.array(v.image, dtype=np.float32)) - prep.mean) / prep.std)[None, None].to(device)
        x = x.contiguous(memory_format=torch.channels_last_3d)
        probs = windows.run(functools.partial(probabilities, x, roi))
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
    ax2.set_ylabel("validation Dice (training grid)")
    ax2.set_ylim(0, 1)
    ax2.legend(loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)


def write_csv(history: list[dict], path: Path) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(history[0]))
            # The Dice columns say the grid they were measured on (validate).
            w.writerow({k: f"{k}_dice_training_grid" if k in (*ORGANS, "mean") else k for k in history[0]})
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


class PhantomStream:
    """--stream: epoch e trains on cfg.stream phantoms whose seeds follow from (seed, e) alone, so a
    resumed run draws what an uninterrupted one would. Validation uses STREAM_VAL_CASES fixed ones.
    With cores to spare (a GPU run), the next epoch's set is made in a background process while this
    one trains; when training already keeps every core busy (a CPU run), they are made between
    epochs: a background process there slows every step (oneDNN waits for its slowest thread) by
    more than the phantoms cost (an atlas phantom takes ~2 s on one core at 3 mm)."""

    def __init__(self, cfg: TrainConfig, background: bool):
        self.cfg = cfg
        if cfg.phantom in ("atlas", "mixed"):
            from atlas_phantom import KITS_NOTE, load_sources

            if not cfg.atlas:
                raise UserError(f"--phantom {cfg.phantom} needs --atlas FOLDER of FLARE22 label maps (labelsTr/)")
            _, lesions = load_sources(cfg.atlas)  # a bad map fails here, in one line, not in the background process
            if lesions:
                print(KITS_NOTE, file=sys.stderr)
        self.pool = None
        if background:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # forkserver: a child forked after this process ran torch operations can deadlock in OpenMP.
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
            self.pool = ProcessPoolExecutor(1, mp_context=context, initializer=torch.set_num_threads, initargs=(1,))
        self.pending: dict[int, list] = {}

    def seeds(self, epoch: int) -> list[int]:
        return [int(s) for s in np.random.SeedSequence([self.cfg.seed, epoch]).generate_state(self.cfg.stream)]

    def _args(self, seed: int, clip: tuple[float, float]) -> tuple:
        c = self.cfg
        return seed, c.phantom, c.spacing, clip, c.atlas, c.phantom_prob

    def _submit(self, epoch: int, seeds: list[int], clip: tuple[float, float]) -> None:
        if self.pool is not None and epoch not in self.pending:
            self.pending[epoch] = [self.pool.submit(phantom_volume, *self._args(s, clip)) for s in seeds]

    def _make(self, epoch: int, seeds: list[int], clip: tuple[float, float]) -> list[Volume]:
        if self.pool is None:
            return [phantom_volume(*self._args(s, clip)) for s in seeds]
        self._submit(epoch, seeds, clip)
        return [f.result() for f in self.pending.pop(epoch)]

    def validation(self, clip: tuple[float, float]) -> list[Volume]:
        seeds = [int(s) for s in np.random.SeedSequence([self.cfg.seed, 2**31 - 1]).generate_state(STREAM_VAL_CASES)]
        return self._make(-1, seeds, clip)

    def volumes(self, epoch: int, clip: tuple[float, float]) -> list[Volume]:
        volumes = self._make(epoch, self.seeds(epoch), clip)
        self._submit(epoch + 1, self.seeds(epoch + 1), clip)
        return volumes

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


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
    if isinstance(state.get("train_config"), dict) and state["train_config"].get("ema") and "train_weights" not in state:
        missing.append("train_weights")
    if missing:
        raise UserError(f"{path}: holds no {', '.join(missing)} (a best.pt or a shipped model); resume from the run "
                        f"folder or its last.pt")
    return state


def init_state(cfg: TrainConfig) -> dict:
    """The checkpoint --init fine-tunes, its voxel size copied into cfg (a differing --spacing is an
    error). Of an ensemble, its member 0."""
    ckpt = load_checkpoint(cfg.init)
    if checkpoint_members(ckpt) > 1:
        source = (ckpt.get("member_sources") or [{}])[0].get("checkpoint", "?")
        print(f"note: {cfg.init} is an ensemble of {checkpoint_members(ckpt)} models; fine-tuning its member 0 "
              f"(from {source})")
        ckpt = {**ckpt, "model": ckpt["members"][0],
                "preprocessing": (ckpt.get("member_preprocessing") or [ckpt.get("preprocessing")])[0]}
    prep = ckpt.get("preprocessing")
    if not isinstance(prep, dict) or "spacing" not in prep or not isinstance(ckpt.get("model_config"), dict):
        raise UserError(f"{cfg.init}: no preprocessing or model_config; --init needs a checkpoint written by train.py")
    spacing = float(prep["spacing"][0])
    if cfg.spacing and abs(cfg.spacing - spacing) > 1e-6:
        raise UserError(f"--spacing {cfg.spacing:g} with --init {cfg.init}: the model was trained at {spacing:g} mm; "
                        f"leave --spacing out to fine-tune at {spacing:g} mm")
    cfg.spacing = spacing
    name = next((n for n, c in PRESETS.items() if c.to_dict() == ckpt["model_config"]), "custom")
    if cfg.preset and cfg.preset != name:
        raise UserError(f"--preset {cfg.preset} with --init {cfg.init}: that checkpoint holds a '{name}' VNet; "
                        f"leave --preset out to fine-tune it")
    cfg.preset = name
    return ckpt


# What the members of an ensemble must share (seeds of one recipe do): same network, labels, default
# window and mirroring; their grids are compared separately, as their intensity statistics may differ.
ENSEMBLE_SHARED = ("model_config", "labels", "roi_size", "augmentation")


def ensemble_member(source: str) -> tuple[Path, dict]:
    """A run folder's final weights (last.pt) or a checkpoint file, loaded."""
    path = Path(source)
    if path.is_dir():
        path = path / "last.pt"
        if not path.is_file():
            raise UserError(f"{path}: no such checkpoint (a run's final weights); pass a run folder that finished an "
                            f"epoch, or a checkpoint file, to --ensemble")
    ckpt = load_checkpoint(path)
    if checkpoint_members(ckpt) > 1:
        raise UserError(f"{path}: is itself an ensemble; pass its member runs (its member_sources) to --ensemble")
    model_from_checkpoint(ckpt, path)  # a clear error now for weights that do not fit their config
    return path, ckpt


def to_half(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating tensors in float16 (half the file), except any a float16 cannot hold (beyond 65504)."""
    out = {}
    for k, v in state.items():
        half = v.half() if v.is_floating_point() else v
        out[k] = half if not v.is_floating_point() or torch.isfinite(half).all() else v
    return out


def build_ensemble(sources: list[str], out: str, model_card: str = "") -> dict:
    """Writes the ensemble checkpoint of `sources` (run folders or checkpoint files) to `out`;
    returns {"checkpoint": out, "members": member_sources, "mib": file size}."""
    path = Path(out)
    if not out or path.suffix != ".pt":
        raise UserError(f"--ensemble-out {out!r}: name the ensemble checkpoint to write, e.g. checkpoints/ensemble.pt")
    if path.exists():
        raise UserError(f"{path}: exists; remove it or choose another --ensemble-out")
    check_writable_folder(path.parent, path, "--ensemble-out")
    if len(sources) < 2:
        raise UserError(f"--ensemble {' '.join(sources)}: an ensemble needs at least two runs or checkpoints")
    members = [ensemble_member(s) for s in sources]
    first, ref = members[0]
    grid = ("orientation", "spacing", "clip")
    for p, c in members[1:]:
        for key in ENSEMBLE_SHARED:
            if c.get(key) != ref.get(key):
                raise UserError(f"{p}: its {key} differs from {first}'s; an ensemble's members must be runs of one "
                                f"recipe (same --preset, --patch, augmentation), differing in --seed")
        if any(c["preprocessing"].get(k) != ref["preprocessing"].get(k) for k in grid):
            raise UserError(f"{p}: its grid (orientation, spacing, clip window) differs from {first}'s; an "
                            f"ensemble's members must be trained at one --spacing")
    origin = []
    for p, c in members:
        cfg = c.get("train_config") or {}
        epoch = c.get("epoch")
        origin.append({"checkpoint": str(p), "run": cfg.get("run") or p.parent.name, "seed": cfg.get("seed"),
                       "epoch": epoch + 1 if isinstance(epoch, int) else None})
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "members": [to_half(c["model"]) for _, c in members],
        "member_sources": origin,
        "member_preprocessing": [c["preprocessing"] for _, c in members],
        "member_metrics": [c.get("metrics") for _, c in members],
        **{k: ref[k] for k in ENSEMBLE_SHARED},
        "preprocessing": ref["preprocessing"],
        "label_map": ref.get("label_map"),
        "train_config": ref.get("train_config"),
    }
    if model_card:
        ckpt["model_card"] = model_card
    save_checkpoint(ckpt, path)
    mib = path.stat().st_size / 2**20
    print(f"ensemble of {len(members)} -> {path} ({mib:.1f} MiB, float16):")
    for o in origin:
        print(f"  {o['checkpoint']}  (run {o['run']}, seed {o['seed']}, epoch {o['epoch']})")
    return {"checkpoint": str(path), "members": origin, "mib": round(mib, 2)}


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
            resume_only = ("optimizer", "scheduler", "scaler", "threads", "train_weights", "ema_updates")
            save_checkpoint({k: v for k, v in state.items() if k not in resume_only}, best_path)
    if history:
        write_csv(history, run_dir / "metrics.csv")
        plot_curves(history, run_dir / "curves.png")


class WeightAverage:
    """An exponential moving average of a model's weights and BatchNorm statistics, updated after every
    optimiser step (Polyak averaging). A run's final weights depend on the last few dozen patches it saw;
    the average spans ~1 / (1 - decay) steps. Bias-corrected as Adam's moments are: step n enters with
    weight (1 - decay) / (1 - decay^n), so the starting weights count for nothing and a run shorter than
    the span is averaged over all its steps. Not torch's AveragedModel: it has no such correction, and its
    state_dict (a "module." prefix, an n_averaged buffer) is not a plain VNet's, which checkpoints must hold.
    """

    def __init__(self, model: torch.nn.Module, decay: float, updates: int = 0):
        self.model = copy.deepcopy(model)
        self.model.requires_grad_(False)
        self.decay, self.updates = decay, updates

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        weight = (1.0 - self.decay) / (1.0 - self.decay ** self.updates)
        for avg, new in zip(self.model.state_dict().values(), model.state_dict().values()):
            if avg.dtype.is_floating_point:
                avg.lerp_(new, weight)
            else:  # BatchNorm's batch counter
                avg.copy_(new)


def make_deterministic() -> None:
    """Deterministic algorithms only (an error for an operation that has none). cuBLAS needs its
    workspace fixed before its first use, cuDNN its autotuner off."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    """Seeds every generator from (seed, epoch) at the start of each epoch, so dropout and any other
    random draw of epoch e are the same whether the run got there uninterrupted or by --resume.
    Ranks under torchrun draw different dropout masks; rank 0 draws what a single process does."""
    state = np.random.SeedSequence([seed, epoch, rank] if rank else [seed, epoch]).generate_state(2)
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))


# ---------------------------------------------------------------------------------------------
# Speed, and several processes under torchrun: DistributedDataParallel, one GPU (or CPU process)
# per rank. Ranks draw disjoint patches, share validation, agree on every decision; rank 0 alone
# writes.

# Set to a folder to have every rank save its final weights there as rank<R>.pt (tests compare them).
DUMP_WEIGHTS_ENV = "ABDOMEN_VNET_DUMP_RANK_WEIGHTS"


class EpochSampler(Sampler[int]):
    """This rank's share of an epoch's n patches, as indices epoch * n + i for i = rank, rank +
    world, ... The epoch travels inside the index because persistent loader workers keep their own
    copy of the dataset: an epoch set on the main process's copy would never reach them."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.n, self.rank, self.world, self.epoch = n, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(range(self.epoch * self.n + self.rank, (self.epoch + 1) * self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


class EpochPatches(Dataset):
    """PatchDataset indexed by EpochSampler's epoch * n + i."""

    def __init__(self, patches: PatchDataset):
        self.patches = patches

    def __len__(self) -> int:
        return len(self.patches)

    def __getitem__(self, index: int):
        epoch, i = divmod(index, len(self.patches))
        self.patches.set_epoch(epoch)
        return self.patches[i]


def loader_workers(workers: int, d: distributed.Dist) -> int:
    """The automatic worker count (resolve()'s) shared by the ranks on one machine."""
    if d.local_world <= 1 or workers <= 0:
        return workers
    return max(1, min(workers, (os.cpu_count() or 1) // d.local_world - 1))


def clip_gradients(parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ with the same result, returning the total norm (0-dim tensor):
    on a CPU, when the norm is already within max_norm, the multiply of every gradient by 1 is
    skipped (a pass over all of them, 182 MB for `vnet`: 2-3 % of its CPU step). On a GPU the
    comparison would wait for the device, so the gradients are always scaled there."""
    total = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    # clip_grad_norm_ scales by min(1, max_norm / (norm + 1e-6)): exactly 1 below this bound.
    if total.device.type != "cpu" or total + 1e-6 > max_norm:
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


def to_training_layout(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """model on device, channels-last 3D weights on CUDA. Activations run channels-last everywhere
    (the input is converted at every step): cuDNN's and oneDNN's fast 3D convolutions use that
    layout. cuDNN wants the weights so too; on a CPU, channels-last weights make oneDNN copy every
    weight gradient back into that layout: a tenth of a VNet step, and the fused optimiser twice as
    slow (bench/RESULTS.md, "Tried, not kept")."""
    model = model.to(device)
    return model.to(memory_format=torch.channels_last_3d) if device.type == "cuda" else model


def load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """opt.load_state_dict(state), then each moment put in its parameter's memory layout. Moments keep
    the layout they were saved in (channels-last from a CUDA run, whose weights are so) while the
    parameters here may not be: the fused kernels walk both as one flat array, so on a CPU the
    updates landed on the wrong weights, and CUDA's fused AdamW refuses the mismatch."""
    opt.load_state_dict(state)
    for group in opt.param_groups:
        for param in group["params"]:
            moments = opt.state.get(param, {})
            for name, value in moments.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    moments[name] = torch.empty_like(param, dtype=value.dtype).copy_(value)


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP that syncs gradients only: each rank's BatchNorm statistics follow its own patches until
    average_buffers (newer torch spells broadcast_buffers=False forward_sync_buffers=False)."""
    params = inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, **no_sync)


def average_buffers(model: torch.nn.Module, d: distributed.Dist) -> None:
    """BatchNorm running statistics averaged over ranks. DDP here syncs gradients only: each rank's
    statistics follow its own patches, and validation and checkpoints need one model."""
    for buf in model.buffers():
        if buf.is_floating_point():
            d.all_reduce_mean_(buf)


def validate_ranks(model: torch.nn.Module, volumes: list[Volume], prep: Preprocessing, cfg: TrainConfig,
                   device: torch.device, amp_dtype: torch.dtype | None, d: distributed.Dist,
                   windows: WindowFallback | None = None) -> dict[str, float]:
    """validate() with the volumes split over the ranks (every world-th), its means combined
    weighted by volume counts: the all-volume means, identical on every rank."""
    if not d.enabled:
        return validate(model, volumes, prep, cfg, device, amp_dtype, windows)
    mine = volumes[d.rank::d.world]
    parts = d.gather((validate(model, mine, prep, cfg, device, amp_dtype, windows) if mine else {}, len(mine)))
    total = sum(n for _, n in parts)
    return {k: sum(m[k] * n for m, n in parts if n) / total for k in parts[0][0]}


def dump_rank_weights(model: torch.nn.Module, d: distributed.Dist) -> None:
    folder = os.environ.get(DUMP_WEIGHTS_ENV)
    if folder:
        weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(weights, Path(folder) / f"rank{d.rank}.pt")


# ---------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> dict:
    if args.ensemble or args.ensemble_out or args.model_card:
        if not args.ensemble:
            raise UserError("--ensemble-out and --model-card go with --ensemble RUN RUN ...: name the runs to pack")
        return build_ensemble(args.ensemble, args.ensemble_out, args.model_card)
    t_start = time.time()
    resume = find_resume(args.resume) if args.resume else None
    state = resume_state(resume) if resume else None
    if state is not None:
        cfg = TrainConfig(**{k: v for k, v in state["train_config"].items() if k in {f.name for f in fields(TrainConfig)}})
        if args.epochs:
            cfg.epochs = args.epochs
        if args.device != TrainConfig.device:  # a run may continue on another device (a CPU run on a GPU)
            cfg.device = args.device
        cfg.deterministic = cfg.deterministic or args.deterministic
    else:
        cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "max_minutes"})
    init = init_state(cfg) if state is None and cfg.init else None
    d = distributed.setup(cfg.device)
    device = d.device
    if resume is not None:
        run_dir = resume.parent
        d.on_main(lambda: check_writable_folder(run_dir, resume, "--resume"))
    else:
        def new_run_dir() -> Path:
            path = Path(cfg.out) / (cfg.run or time.strftime("%Y%m%d-%H%M%S"))
            check_new_run_dir(path)
            return path

        run_dir = d.on_main(new_run_dir)  # rank 0's clock names the folder for all
    defaults = all(getattr(args, k) == getattr(TrainConfig, k) for k in ("epochs", "steps_per_epoch", "patch", "preset"))
    cfg.max_minutes = args.max_minutes if args.max_minutes is not None else (
        13.0 if device.type == "cpu" and defaults and state is None else 0.0)
    auto_workers = cfg.workers < 0
    cfg = cfg.resolve(device)
    if auto_workers:
        cfg.workers = loader_workers(cfg.workers, d)
    if cfg.patch % 16:
        raise UserError(f"--patch {cfg.patch}: must be a multiple of 16 (the VNet halves it four times)")
    if cfg.batch_size < 1 or cfg.steps_per_epoch < 1 or cfg.epochs < 1:
        raise UserError("--batch-size, --steps-per-epoch and --epochs must be at least 1")
    if not 0.0 <= cfg.ema < 1.0:
        raise UserError(f"--ema {cfg.ema:g}: the decay must lie in [0, 1), e.g. 0.999 (0: off)")
    source = state or init  # weights to start from: the run to resume, or the model to fine-tune
    norm = source["model_config"]["norm"] if source is not None else PRESETS[cfg.preset].norm
    if cfg.batch_size * (cfg.patch // 16) ** 3 < 2 and norm == "batch":
        raise UserError(f"--patch {cfg.patch} with --batch-size {cfg.batch_size}: the VNet's deepest stage holds one "
                        f"voxel, and batch norm needs two values; use --batch-size 2 or a larger --patch")
    configure_torch(device)
    if cfg.deterministic:
        make_deterministic()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    # Data
    spare_cores = device.type == "cuda" or (os.cpu_count() or 1) > torch.get_num_threads() + 1
    stream = PhantomStream(cfg, background=spare_cores) if cfg.stream else None
    if stream is not None:
        data, label_map = f"{cfg.stream} {cfg.phantom} phantoms made fresh per epoch", "identity"
        prep = Preprocessing(spacing=(cfg.spacing,) * 3)
        val_vols, train_vols = stream.validation(prep.clip), stream.volumes(0 if state is None else state["epoch"] + 1, prep.clip)
        prep.mean, prep.std = intensity_stats(train_vols, prep.clip)
    else:
        data = d.main_first(lambda: resolve_data(cfg))  # rank 0 generates the phantoms, the others then find them
        train_vols, val_vols, prep, label_map = load_volumes(data, cfg, d)
    if source is not None:
        # The weights learned on the normalisation they came with; a resumed or fine-tuned run keeps it.
        prep = Preprocessing.from_dict(source["preprocessing"])
    aug = AugmentConfig()
    patch = (cfg.patch,) * 3

    def make_loader(volumes: list[Volume]) -> tuple[EpochSampler, DataLoader]:
        # --batch-size is per rank: an epoch's steps draw batch_size * world patches each.
        train_set = PatchDataset(volumes, prep, patch, cfg.steps_per_epoch * cfg.batch_size * d.world, aug, cfg.seed,
                                 defer=cfg.gpu_augment)
        sampler = EpochSampler(len(train_set), d.rank, d.world)
        persistent = cfg.workers > 0 and stream is None  # a stream's loader lives one epoch
        loader = DataLoader(EpochPatches(train_set), batch_size=cfg.batch_size, sampler=sampler,
                            num_workers=cfg.workers, collate_fn=collate_crops if cfg.gpu_augment else None,
                            pin_memory=device.type == "cuda", persistent_workers=persistent,
                            prefetch_factor=2 if cfg.workers > 0 else None)
        return sampler, loader

    sampler, loader = make_loader(train_vols)

    # Model, loss, optimiser, schedule
    torch.manual_seed(cfg.seed)  # the initial weights depend on the seed alone, not on what ran before
    model = model_from_checkpoint(source, resume or cfg.init) if source is not None else build_vnet(cfg.preset)
    model = to_training_layout(model.train(), device)
    net = model
    if d.enabled:
        net = wrap_ddp(model, device)
    if cfg.compile:
        net = torch.compile(net)
    loss_fn = DiceCELoss()
    # Fused optimisers (CPU and CUDA since torch 2.4): one kernel over all parameters, 2x faster on a CPU.
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.99, nesterov=True, weight_decay=cfg.weight_decay,
                              fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    # A resumed run's "model" is the average; the weights it was training continue from "train_weights".
    ema = WeightAverage(model, cfg.ema, state.get("ema_updates", 0) if state else 0) if cfg.ema else None
    if ema is not None and state is not None:
        model.load_state_dict(state["train_weights"])
    kept = ema.model if ema is not None else model  # the weights validation scores and checkpoints hold
    amp_dtype = mixed_precision_dtype(device, training=True) if cfg.amp else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    history: list[dict] = []
    best, best_epoch, start_epoch = -1.0, -1, 0
    if state is not None:  # the model already holds its weights (model_from_checkpoint)
        load_optimizer_state(opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if scaler.is_enabled() and state.get("scaler"):  # fp16 then and now; else the scale starts afresh
            scaler.load_state_dict(state["scaler"])
        history = list(state["history"])
        best, best_epoch, start_epoch = state["best_metric"], state["best_epoch"], state["epoch"] + 1
        threads = state.get("threads", torch.get_num_threads())
        if cfg.deterministic and device.type == "cpu" and threads != torch.get_num_threads():
            # CPU reductions split work by thread: the same weights need the same thread count.
            if d.main:
                print(f"note: {threads} CPU threads as in the interrupted run (here {torch.get_num_threads()} by default)")
            torch.set_num_threads(threads)
        if d.main:
            print(f"resuming {run_dir} at epoch {start_epoch + 1}")
    elif d.main:
        run_dir.mkdir(parents=True, exist_ok=False)
    if d.main:
        ranks = f" x {d.world} processes (batch {cfg.batch_size} each)" if d.enabled else ""
        print(f"{len(train_vols)} training / {len(val_vols)} validation cases from {data} (labels: {label_map}); "
              f"VNet '{cfg.preset}' {count_parameters(model) / 1e6:.1f} M parameters on {device}{ranks}"
              f"{f' in {amp_dtype} mixed precision' if amp_dtype is not None else ''}; "
              f"patch {cfg.patch}^3 at {cfg.spacing} mm; run folder {run_dir}")

    grid = f"{prep.spacing[0]:g} mm training grid"

    def checkpoint(epoch: int, metrics: dict, full: bool) -> dict:
        ckpt = {
            "format": CHECKPOINT_FORMAT,
            "model": {k: v.detach().cpu() for k, v in kept.state_dict().items()},
            "model_config": model.cfg.to_dict(),
            "preprocessing": prep.to_dict(),
            "labels": {str(k): v for k, v in LABELS.items()},
            "roi_size": [cfg.patch] * 3,
            "epoch": epoch,
            "metrics": metrics,
            "metrics_grid": grid,  # validation Dice is training-grid Dice (validate)
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
            if ema is not None:
                ckpt["train_weights"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
                ckpt["ema_updates"] = ema.updates
        return ckpt

    if state is not None and d.main:
        repair_run_dir(run_dir, state, history)

    planned_epochs, epoch_minutes = cfg.epochs, []
    val_windows = WindowFallback(4, device)  # lighter after an out-of-memory error, for the epochs that follow

    def end_epoch(epoch: int, trained: dict) -> str | None:
        """Validation of the epoch trained (its row so far: epoch, lr, train_loss, seconds), its row in
        the history, the checkpoints, and rank 0's decision for all: why to stop, or None."""
        nonlocal best, best_epoch
        t0 = time.time()
        metrics = validate_ranks(kept, val_vols, prep, cfg, device, amp_dtype, d, val_windows)
        row = {**{k: v for k, v in trained.items() if k != "seconds"}, **{k: round(v, 4) for k, v in metrics.items()},
               "seconds": round(trained["seconds"] + time.time() - t0, 1)}
        history.append(row)
        improved = metrics["mean"] > best + 1e-4
        if improved:
            best, best_epoch = metrics["mean"], epoch
        if d.main:
            # last.pt first: a kill between the two saves leaves a last.pt that names this epoch as the
            # best, from which --resume rewrites best.pt (repair_run_dir).
            save_checkpoint(checkpoint(epoch, metrics, full=True), run_dir / "last.pt")
            if improved:
                save_checkpoint(checkpoint(epoch, metrics, full=False), run_dir / "best.pt")
            write_csv(history, run_dir / "metrics.csv")
            plot_curves(history, run_dir / "curves.png")
            organs = "  ".join(f"{o} {metrics[o]:.3f}" for o in ORGANS)
            tqdm.write(f"epoch {epoch + 1:3d}  loss {row['train_loss']:.4f}  val Dice ({grid}) {organs}  "
                       f"mean {metrics['mean']:.3f}"
                       f"{'  *best' if improved else ''}  ({row['seconds']:.0f} s)")
        stop = None
        if epoch - best_epoch >= cfg.patience:
            stop = f"early stop: no better mean Dice for {cfg.patience} epochs"
        elif cfg.max_minutes:
            # Fit the remaining epochs (and so the LR schedule) into the time budget, re-estimated
            # every epoch from the median epoch so far: the first is slower (warm-up, first-touch
            # memory), and estimating from it alone left minutes of the budget unused.
            epoch_minutes.append(row["seconds"] / 60)
            elapsed = (time.time() - t_start) / 60
            per_epoch = float(np.median(epoch_minutes[1:] or epoch_minutes))
            fits = min(planned_epochs, max(epoch + 1, epoch + 1 + int((cfg.max_minutes - elapsed) / per_epoch)))
            if fits != cfg.epochs:
                cfg.epochs = fits
                if d.main:
                    tqdm.write(f"time budget {cfg.max_minutes:g} min: schedule set to {cfg.epochs} epochs")
            if epoch + 1 >= cfg.epochs:
                stop = f"time budget of {cfg.max_minutes:g} min reached"
        # Rank 0 decides for all: clocks differ between ranks, and all must leave the loop together.
        stop, cfg.epochs = d.broadcast((stop, cfg.epochs))
        return stop

    # Training loop
    epoch = start_epoch - 1
    # A run stopped while validating (killed, or out of memory) saved its epoch's training: validate it first.
    stop = end_epoch(epoch, state["unvalidated"]) if state is not None and state.get("unvalidated") else None
    stopped = stop or "finished all epochs"
    for epoch in range(start_epoch, cfg.epochs if stop is None else start_epoch):
        t0 = time.time()
        if stream is not None and epoch != start_epoch:
            train_vols = stream.volumes(epoch, prep.clip)
            sampler, loader = make_loader(train_vols)
        model.train()
        seed_epoch(cfg.seed, epoch, d.rank)
        sampler.set_epoch(epoch)
        losses = []
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step", leave=False, disable=not d.main)
        for batch in bar:
            if cfg.gpu_augment:
                image, label = augment_batch(batch, prep, aug, device)
            else:
                image, label = (t.to(device, non_blocking=True) for t in batch)
                label = label.long()  # uint8 from the loader: shared memory holds an eighth of int64
            image = image.contiguous(memory_format=torch.channels_last_3d)
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = net(image)
            loss = loss_fn(logits.float(), label)
            # The mean over ranks: logged, and checked by every rank alike, so all stop together.
            mean_loss = d.all_reduce_mean_(loss.detach().clone()) if d.enabled else loss
            if not torch.isfinite(mean_loss):
                raise UserError(f"loss became {mean_loss.item()} at epoch {epoch + 1}; lower --lr or check the data")
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            clip_gradients(list(model.parameters()), 12.0)
            scaler.step(opt)
            scaler.update()
            sched.step()
            if ema is not None:
                ema.update(model)
            losses.append(mean_loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        if d.enabled:
            average_buffers(model, d)
            if ema is not None:
                average_buffers(ema.model, d)
        trained = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "train_loss": float(np.mean(losses)),
                   "seconds": time.time() - t0}
        if d.main:
            # Saved before validating, so a validation that fails (out of memory, killed) loses no training.
            save_checkpoint({**checkpoint(epoch, {}, full=True), "unvalidated": trained}, run_dir / "last.pt")
        stop = end_epoch(epoch, trained)
        if stop:
            stopped = stop
            break

    if stream is not None:
        stream.close()
    summary = None
    if d.main:
        best_ckpt = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
        final = {organ: round(best_ckpt["metrics"][organ], 4) for organ in [*ORGANS, "mean"]}
        summary = {**final, "grid": "training", "grid_spacing_mm": float(prep.spacing[0]),
                   "best_epoch": best_ckpt["epoch"] + 1, "epochs_run": epoch + 1, "stopped": stopped,
                   "minutes": round((time.time() - t_start) / 60, 2), "checkpoint": str(run_dir / "best.pt")}
        atomic_write(run_dir / "metrics.json", lambda tmp: tmp.write_text(json.dumps(summary, indent=2)))
        print(f"\n{stopped}. Best validation Dice on the {grid} (epoch {summary['best_epoch']}; infer.py --label "
              f"scores a scan on its own grid), {run_dir / 'best.pt'}:")
        print(f"  {'organ':<14}{'Dice':>8}")
        for organ in [*ORGANS, "mean"]:
            print(f"  {organ:<14}{final[organ]:>8.4f}")
    dump_rank_weights(model, d)
    return d.broadcast(summary)


if __name__ == "__main__":
    try:
        run_cli(main, parse_args())
    finally:
        distributed.teardown()
