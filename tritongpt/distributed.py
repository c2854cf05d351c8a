"""Data-parallel training under torchrun, in one place: process-group set-up, wrapping the model (DDP now; FSDP can
slot in here), gradient-sync control for accumulation, and the few collectives the trainer needs.

Run alone (`python train.py`) this is a world of one and every call is a no-op.
"""
import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tritongpt.device import resolve_device
from tritongpt.errors import UserError

# How long a collective may wait for a missing rank before the job fails instead of hanging. torchrun also ends
# the whole job as soon as any worker process exits with an error.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)
# A gloo group beside NCCL's, for the flags the ranks agree on at every step: on the host, such a flag never waits
# for the GPU. (On CPU the default group is gloo already, and this stays None.)
_host_group = None
# A gloo group of its own for checkpoint writes, whose collectives run in a background thread while the training
# step's run in the main one: two threads must never share a group.
_checkpoint_group = None


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env(device_option: str) -> World:
    """This process's place among torchrun's (a world of one when run alone), read from the environment: no
    collective runs yet, so a mistake found before join() ends every rank alike."""
    if "RANK" not in os.environ:
        return World(0, 1, resolve_device(device_option))
    rank, local_rank, size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    device = resolve_device(device_option)
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                            "lower --nproc_per_node to the GPUs per node")
        device = torch.device("cuda", local_rank)
    return World(rank, size, device)


def join(world: World) -> None:
    """Join the process group (NCCL on CUDA, gloo on CPU); nothing to do in a world of one."""
    if not world.distributed:
        return
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    global _host_group
    backend = "nccl" if world.device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT,
                            device_id=world.device if world.device.type == "cuda" else None)
    if backend == "nccl":
        _host_group = dist.new_group(backend="gloo")
    global _checkpoint_group
    _checkpoint_group = dist.new_group(backend="gloo")


def checkpoint_group():
    """The process group checkpoints are written with (None in a world of one)."""
    return _checkpoint_group


def launch() -> tuple[str | None, int]:
    """(torchrun's id of this job, how many times it restarted the workers): (None, 0) when run alone. A restarted
    worker keeps the job's id; a new launch gets a new one, unless the user names the job (--rdzv-id) and names
    the next one alike, and "none" is torchrun's own name for a job whose user named none."""
    return os.environ.get("TORCHELASTIC_RUN_ID"), int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def wrap_model(model: torch.nn.Module, world: World) -> torch.nn.Module:
    """The model as the training step sees it: DDP across ranks (the place to switch to FSDP for larger models)."""
    if not world.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[world.device.index] if world.device.type == "cuda" else None)


def gradient_sync(model: torch.nn.Module, sync: bool):
    """Inside this block backward() all-reduces gradients only when sync is True: accumulation micro-steps skip it."""
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def sum_across_ranks(value: torch.Tensor, world: World) -> torch.Tensor:
    return _all_reduce(value, dist.ReduceOp.SUM, world)  # gloo has no AVG


def min_across_ranks(value: torch.Tensor, world: World) -> torch.Tensor:
    return _all_reduce(value, dist.ReduceOp.MIN, world)


def _all_reduce(value: torch.Tensor, op, world: World) -> torch.Tensor:
    if world.distributed:
        value = value.clone()
        dist.all_reduce(value, op=op)
    return value


def max_on_host(value: int, world: World) -> int:
    """The largest of the values the ranks hold, computed without waiting for the device: cheap enough to call at
    every step."""
    if not world.distributed:
        return value
    t = torch.tensor(value)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group)
    return int(t)


def gather_objects(obj, world: World) -> list:
    """obj from every rank, in rank order (a list of one when alone)."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def leave(world: World) -> None:
    global _host_group, _checkpoint_group
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()  # every group, the host and checkpoint groups included
        _host_group = _checkpoint_group = None
