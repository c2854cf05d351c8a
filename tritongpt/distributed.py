"""Data-parallel training under torchrun, in one place: process-group set-up, wrapping the model (DDP, or FSDP2's
fully_shard), gradient-sync control for accumulation, and the few collectives the trainer needs.

DDP keeps the whole model, its gradients and AdamW's state on every rank; FSDP2 (`parallel="fsdp"`) shards all three
across the ranks, gathering each Block's weights just before it computes, so a rank holds about 1/N of them between
uses. With `replicate` R > 1 it shards within groups of N / R ranks and replicates across the R groups (HSDP), so
the gathers stay inside a group (a node) and only the gradient all-reduce crosses between them.

Run alone (`python train.py`) this is a world of one and every collective is a no-op; under FSDP that world of one
still gets a process group of one rank, which fully_shard needs.
"""
import contextlib
import datetime
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from tritongpt.device import resolve_device
from tritongpt.errors import UserError

# How long a collective may wait for a missing rank before the job fails instead of hanging. torchrun also ends
# the whole job as soon as any worker process exits with an error.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)
PARALLELISMS = ("ddp", "fsdp")
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
    parallel: str = "ddp"  # how the model is spread over the ranks: one of PARALLELISMS

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def sharded(self) -> bool:
        """Whether each rank holds only a shard of the model: its forward is then a collective, which every rank
        must call as often as the others."""
        return self.parallel == "fsdp"


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
    """Join the process group (NCCL on CUDA, gloo on CPU); nothing to do in a world of one, unless it is sharded."""
    if not (world.distributed or world.sharded):
        return
    if world.device.type == "cuda":
        torch.cuda.set_device(world.device)
    global _host_group
    backend = "nccl" if world.device.type == "cuda" else "gloo"
    alone = {} if world.distributed else dict(store=dist.HashStore(), rank=0, world_size=1)  # no torchrun to meet
    dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT,
                            device_id=world.device if world.device.type == "cuda" else None, **alone)
    if backend == "nccl" and world.distributed:
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


def wrap_model(model: torch.nn.Module, world: World, compile: bool = False, replicate: int = 1,
               reshard_after_forward: bool = True,
               dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the model as evaluation calls it, the model as the training step calls it), compiled when `compile`.

    Under DDP the training step's model is wrapped in DistributedDataParallel across the ranks. Under FSDP the model
    itself is sharded, in place (so build the optimizer after this, over its sharded parameters): each Block
    is a unit whose weights are gathered for its forward and backward, and the root (the embeddings, the final
    LayerNorm, and the LM head that shares the token embedding's weight) another. On a GPU the weights are
    gathered in the compute dtype (half the bytes of float32) and the gradients reduced in float32; on a CPU all
    stays float32. After its forward each Block frees its gathered weights (reshard_after_forward) to gather them
    again for the backward, or keeps them, trading memory for a gather."""
    if world.sharded:
        # Some op outputs reach a Block's output as views (a Linear over (B, T, C) reshapes its matmul's result);
        # FSDP warns since an in-place op on one would skip its backward hook, and this model makes none.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")
        mesh = device_mesh(world, replicate)
        mixed = world.device.type == "cuda" and dtype != torch.float32
        policy = MixedPrecisionPolicy(param_dtype=dtype if mixed else None,
                                      reduce_dtype=torch.float32 if mixed else None)
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    compiled = torch.compile(model) if compile else model
    if not world.distributed or world.sharded:
        return compiled, compiled
    ddp = DistributedDataParallel(compiled, device_ids=[world.device.index] if world.device.type == "cuda" else None)
    return compiled, ddp


def device_mesh(world: World, replicate: int):
    """The ranks as FSDP spreads the model over them: one dimension that shards, or with replicate > 1 (HSDP)
    replicate groups of consecutive ranks, each sharding the model within itself."""
    if replicate == 1:
        return init_device_mesh(world.device.type, (world.size,), mesh_dim_names=("shard",))
    return init_device_mesh(world.device.type, (replicate, world.size // replicate),
                            mesh_dim_names=("replicate", "shard"))


def gradient_sync(model: torch.nn.Module, sync: bool):
    """Inside this block backward() reduces gradients across ranks only when sync is True: accumulation micro-steps
    skip it (and, under FSDP, keep their gradients whole until the last micro-step reduces and shards them)."""
    if isinstance(fsdp := getattr(model, "_orig_mod", model), FSDPModule):  # _orig_mod: under torch.compile
        return _fsdp_gradient_sync(fsdp, sync)
    if sync or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


@contextlib.contextmanager
def _fsdp_gradient_sync(model: FSDPModule, sync: bool):
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def whole(value: torch.Tensor) -> torch.Tensor:
    """A tensor computed from sharded ones (a DTensor, such as the gradient norm over sharded gradients) as the plain
    tensor of its full value; any other tensor as it is."""
    return value.full_tensor() if isinstance(value, DTensor) else value


@contextlib.contextmanager
def whole_weights(model: torch.nn.Module):
    """Inside this block the model can be called by its methods other than forward (text generation): under FSDP
    the root's weights stay gathered, the Blocks gather theirs as they run. Every rank must then make the same
    calls, since each Block's gather is a collective."""
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


TRAINING_STATE_BYTES = 16  # a float32 weight, its gradient and AdamW's two moments, per parameter


def training_state_bytes(model: torch.nn.Module, shards: int = 1) -> int:
    """The bytes of weights, gradients and AdamW state that the rank holding the most of them holds, from the
    parameters' shapes alone (a model on the meta device will do): the whole of them under DDP (shards=1); under
    FSDP split into `shards`, where each parameter is cut along its first dimension and a shard holds
    ceil(rows / shards) of them at most (so uneven rows cost up to a row a parameter)."""
    return TRAINING_STATE_BYTES * sum(-(-p.shape[0] // shards) * (p.numel() // max(p.shape[0], 1))
                                      for p in model.parameters())


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
    if (world.distributed or world.sharded) and dist.is_initialized():
        dist.destroy_process_group()  # every group, the host and checkpoint groups included
        _host_group = _checkpoint_group = None
