"""Multi-process plumbing for train.py and infer.py under torchrun (PyTorch distributed): which
process this is, the process group, and the few collectives the scripts need.

    torchrun --standalone --nproc_per_node=4 train.py ...                # one machine, four GPUs
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
             --rdzv-endpoint=HOST:29500 --rdzv-id=RUN train.py ...       # two machines

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE for each process. Without them
(plain `python train.py`), or with a world of one, everything here is a no-op: no process group.
Rank r drives GPU LOCAL_RANK with NCCL, or the CPU with gloo.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from utils import UserError, pick_device

T = TypeVar("T")

# Generous: ranks legitimately wait on each other while rank 0 generates the phantom data set or
# one rank finishes a slow scan; a crashed rank does not leave the others waiting, torchrun stops them.
TIMEOUT = timedelta(minutes=60)
# For waits whose length grows with the dataset (preprocessing a thousand CTs into the cache): on a
# gloo group of its own, as NCCL's watchdog would end the run after TIMEOUT.
LONG_TIMEOUT = timedelta(hours=24)
_long_group: list = []  # the gloo group of every_rank's wait, made at its first use


def env_rank() -> int:
    """This process's global rank from torchrun's environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this process prints progress and writes outputs: rank 0, or the only process."""
    return env_rank() == 0


@dataclass(frozen=True)
class Dist:
    """This process's place among the torchrun processes; a world of one is a plain run."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def broadcast(self, obj: T) -> T:
        """Rank 0's obj on every rank (any picklable object)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: T) -> list[T]:
        """Every rank's obj, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Replaces tensor (on this rank's device) by its mean over ranks, in place (gloo has no AVG)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor.div_(self.world)
        return tensor

    def _attempt(self, fn: Callable[[], T]) -> tuple[T | None, str | None]:
        """(fn()'s result, None), or under torchrun (None, its UserError's message) for the caller to
        share with the other ranks; alone, the UserError is raised as it is."""
        try:
            return fn(), None
        except UserError as e:
            if not self.enabled:
                raise
            return None, str(e)

    def _run_on_main(self, fn: Callable[[], T], share: bool) -> T | None:
        """fn() on rank 0, its result broadcast when share; a UserError there is raised on every
        rank, so none waits on a rank that gave up."""
        result, error = self._attempt(fn) if self.main else (None, None)
        shared, error = self.broadcast((result if share else None, error))
        if error is not None:
            raise UserError(error)
        return shared if share else result

    def every_rank(self, fn: Callable[[], T]) -> T:
        """fn() on every rank, then a wait until all have finished, with LONG_TIMEOUT (for work that
        takes each rank as long as its share of the dataset). A UserError on any rank is raised on
        every rank, so none waits on a rank that gave up."""
        if self.enabled and not _long_group:  # made while the ranks are together, before their work diverges
            _long_group.append(dist.new_group(backend="gloo", timeout=LONG_TIMEOUT))
        result, error = self._attempt(fn)
        if self.enabled:
            errors: list = [None] * self.world
            dist.all_gather_object(errors, error, group=_long_group[0])
            error = next((e for e in errors if e is not None), None)
        if error is not None:
            raise UserError(error)
        return result

    def on_main(self, fn: Callable[[], T]) -> T:
        """fn() run by rank 0 alone (creating the run folder); every rank gets its picklable result."""
        return self._run_on_main(fn, share=True)

    def main_first(self, fn: Callable[[], T]) -> T:
        """fn() on rank 0, then on the others: rank 0 makes what they would race to make (the
        phantom data set), they find it made."""
        result = self._run_on_main(fn, share=False)
        return result if self.main else fn()


def setup(device_name: str = "auto") -> Dist:
    """This process's Dist and device; joins the process group when torchrun started several.

    device_name as for utils.pick_device; under torchrun "cuda" means GPU LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = pick_device(device_name)
    if world <= 1:
        if device.type == "cuda" and device.index is not None:
            # The current device is GPU 0 unless set: pinned memory, the bf16 query and synchronize() follow it.
            torch.cuda.set_device(device)
        return Dist(device=device)
    rank, local_rank = env_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"torchrun started {local_world} processes on this machine but it has "
                            f"{torch.cuda.device_count()} GPU(s); pass --nproc_per_node={torch.cuda.device_count()}")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
    return Dist(rank, world, local_rank, local_world, device)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _long_group.clear()
