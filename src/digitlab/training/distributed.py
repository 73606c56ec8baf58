"""Training on several processes: torchrun's process group, each rank its shard of every batch.

`torchrun --nproc-per-node N -m digitlab train ...` (or `digitlab train --nproc N`, which
starts the same workers through torch's own elastic launcher) gives each process RANK,
WORLD_SIZE, LOCAL_RANK and the rendezvous's address in its environment. `start()` joins them
into one process group (gloo on the CPU, nccl on CUDA), and from then on:

- every rank draws the same seeded order of batches, and takes its equal slice of each
  (`--batch-size` is the global batch); DistributedDataParallel averages the gradients, so
  a step is the single-process step on the whole batch, to float rounding;
- each step's loss is averaged over the ranks together with whether any rank was asked to
  stop (a signal), so every rank records the same loss and stops after the same step;
- rank 0 alone prints, validates (and tells the others), and writes the run folder; a
  resumed run's state is read by rank 0 and sent to the others, so the nodes need no shared
  disk.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from digitlab.errors import UserError
from digitlab.signals import SIGNALS  # the stop requests a step can carry, in this order

TIMEOUT = 300  # seconds a collective may wait for the other ranks before it fails


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; a single process is rank 0 of 1."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # "gloo" or "nccl" inside a process group, None outside one

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


SINGLE = World()
_joined = False  # whether this process joined a process group (start)


def launched() -> bool:
    """Whether torchrun (or `--nproc`) started this process as one of a group."""
    return "TORCHELASTIC_RUN_ID" in os.environ or {"RANK", "WORLD_SIZE", "MASTER_ADDR"} <= set(os.environ)


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 outside a group), before the group is joined."""
    return int(os.environ.get("RANK", 0))


def current() -> World:
    """The process group this process belongs to (one that a user's own code set up counts too)."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    return World(rank=dist.get_rank(), size=dist.get_world_size(),
                 local_rank=int(os.environ.get("LOCAL_RANK", 0)), backend=dist.get_backend())


def start(device: str) -> World:
    """Join the process group torchrun set up: nccl when training on CUDA, gloo otherwise."""
    global _joined
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        check_gpus(local_size, f"{local_size} processes on this machine")
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=TIMEOUT))
    _joined = True
    return current()


def joined() -> bool:
    """Whether this process joined a process group: it ends through `leave`."""
    return _joined


def leave(code: int) -> NoReturn:
    """End a process that joined a process group, with `code` and without the interpreter's clean-up,
    as multiprocessing's children end. The group's C++ threads outlive destroy_process_group, and one
    that wants the GIL while the interpreter shuts down aborts the process ("terminate called without
    an active exception", SIGABRT), which the launcher reports as a death. The files are closed by now."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code)


def check_gpus(processes: int, how: str) -> None:
    """One GPU per process on this machine, or one line saying how many there are."""
    gpus = torch.cuda.device_count()
    if gpus < processes:
        fewer = f"start {gpus} or fewer, or use --device cpu" if gpus else "use --device cpu"
        raise UserError(f"--device cuda with {how}, but PyTorch sees {gpus} CUDA GPU{'' if gpus == 1 else 's'} "
                        f"here; {fewer}")


def together(world: World) -> None:
    """Waits until every process has come here (a barrier), where there are several."""
    if world.distributed:
        dist.barrier()


def stop() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(world: World, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's equal slice of a global batch."""
    per = len(labels) // world.size
    part = slice(world.rank * per, (world.rank + 1) * per)
    return images[part], labels[part]


def agree(world: World, loss: torch.Tensor, asked: str | None) -> tuple[torch.Tensor, str | None]:
    """The loss averaged over the ranks, and the stop any rank was asked for (SIGINT before SIGTERM)."""
    votes = torch.zeros(1 + len(SIGNALS), device=loss.device)
    votes[0] = loss.detach().float()
    if asked in SIGNALS:
        votes[1 + SIGNALS.index(asked)] = 1
    dist.all_reduce(votes)
    stopped = next((name for k, name in enumerate(SIGNALS) if votes[1 + k] > 0), None)
    return (votes[0] / world.size).to(loss.dtype), stopped


def from_main(world: World, value):
    """Rank 0's `value`, on every rank (any picklable object; tensors travel on the CPU)."""
    if not world.distributed:
        return value
    box = [value if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def setting_out(world: World):
    """Rank 0's start of a run, shared: the block calls `share(x)` once it has what the other ranks
    need (a resumed run's state); if it fails first, the others get its error instead of waiting."""
    shared = []

    def share(value):
        shared.append(True)
        return from_main(world, {"value": value})["value"]

    try:
        yield share
    except BaseException as e:
        if world.distributed and world.main and not shared:
            from_main(world, {"error": str(e) if isinstance(e, UserError) else f"rank 0 failed: {type(e).__name__}"})
        raise


def follow(world: World):
    """What rank 0's `setting_out` shares, on the other ranks (its error, raised here)."""
    got = from_main(world, None)
    if "error" in got:
        raise UserError(got["error"])
    return got["value"]


def everywhere(world: World, step):
    """`step()` on every rank, and its UserError on all of them if it failed on any: a machine
    without the data (say) is named by rank 0 instead of leaving the others waiting."""
    if not world.distributed:
        return step()
    try:
        value, error = step(), None
    except UserError as e:
        value, error = None, str(e)
    errors: list = [None] * world.size
    dist.all_gather_object(errors, error)
    for rank, message in enumerate(errors):
        if message is not None:
            raise UserError(message if rank == 0 else f"process {rank} of {world.size}: {message}")
    return value


def lost(error: BaseException) -> bool:
    """Whether `error` is a collective failing because another rank died or went silent."""
    text = f"{type(error).__name__} {error}"
    return isinstance(error, (RuntimeError, pickle.UnpicklingError)) and any(
        word in text for word in ("Connection closed", "Connection reset", "Broken pipe", "Timed out", "timed out",
                                  "DistBackendError", "NCCL", "Gloo", "gloo"))


def sibling_gone() -> bool:
    """Whether one of the processes that the same launcher started on this machine (torchrun, `--nproc`)
    has ended: fewer than LOCAL_WORLD_SIZE of its children are running. A launcher that sees a process
    die stops the others with SIGTERM; this tells that SIGTERM from one a user sent. False where it
    cannot be told (no /proc)."""
    parent = Path(f"/proc/{os.getppid()}")
    try:
        children = [pid for task in (parent / "task").iterdir() for pid in (task / "children").read_text().split()]
    except OSError:
        return False
    running = 0
    for pid in children:
        with contextlib.suppress(OSError):  # gone already
            running += (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) not in ("Z", "X")
    return running < int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
