"""Checkpoints: sharded, written in the background, never half-visible, and readable on any number of processes.

A run keeps its checkpoints in OUT_DIR/checkpoints/, one folder per step (step_000200/):
  - the model's and the optimizers' tensors, written by torch.distributed.checkpoint: every rank writes its own part
    (its shards under FSDP; a replicated model's tensors are spread over the ranks), so nothing is gathered on one
    rank, and a checkpoint written by N processes loads on M (resharding);
  - trainer.pt, the rest of the run's state (options, model config, tokenizer, step, data position, random streams,
    the optimizers' settings), written by rank 0.
A step's folder is written under a hidden name and renamed once every rank's part is on disk; then `latest`, a
one-line file naming it, is replaced atomically (a temporary file, then a rename). A process killed at any moment of
a write leaves the previous checkpoint whole and `latest` naming it.

Read on one process (sampling, export), a checkpoint is one dict, the single-file form: load_checkpoint() returns it,
`python -m tritongpt.checkpoint RUN --to FILE` writes it, and the ckpt.pt of earlier versions holds it. Everything is
read with torch.load(weights_only=True), or an unpickler that builds only checkpoint metadata: loading a checkpoint
cannot run code.
"""
import argparse
import contextlib
import dataclasses
import enum
import pickle
import re
import shutil
import signal
import warnings
import zipfile
from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor

from tritongpt import distributed
from tritongpt.data.tokenizer import HuggingFaceTokenizer, Tokenizer, tokenizer_from_bytes
from tritongpt.errors import UserError
from tritongpt.files import atomic_file, disk_full

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
TRAINER_FILE = "trainer.pt"
SINGLE_FILE = "ckpt.pt"  # the single-file form, as earlier versions wrote it into OUT_DIR
REQUIRED_KEYS = ("model", "model_config", "iter_num")
STEP_FOLDER = re.compile(r"step_(\d+)")
# What reading a damaged checkpoint raises (torch.distributed.checkpoint gathers the ranks' errors into a
# CheckpointException, which is a BaseException).
UNREADABLE = (RuntimeError, OSError, ValueError, EOFError, pickle.UnpicklingError, dcp.api.CheckpointException)
# torch.distributed.checkpoint warns at every save and load in a single process, even when asked for one.
SINGLE_PROCESS_WARNING = "torch.distributed is .*assuming the intent is to .* single process"
warnings.filterwarnings("ignore", message=SINGLE_PROCESS_WARNING)


def step_folder_name(step: int) -> str:
    return f"step_{step:06d}"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The last complete checkpoint of the run in OUT_DIR (a step folder, or an earlier version's ckpt.pt)."""
    out_dir = Path(out_dir)
    pointer = out_dir / CHECKPOINTS_DIR / LATEST_FILE
    if pointer.is_file():
        folder = pointer.parent / pointer.read_text().strip()
        if not (folder / TRAINER_FILE).is_file():
            raise UserError(f"{pointer} names {folder.name}, which is missing or incomplete: the run's checkpoints "
                            "were moved or deleted by hand; point it at a complete step folder, or start over with "
                            "--overwrite")
        return folder
    legacy = out_dir / SINGLE_FILE
    return legacy if legacy.is_file() else None


def checkpoint_location(path: str | Path) -> Path:
    """The checkpoint a user names: a step folder, a single file, or a run's OUT_DIR (its latest checkpoint)."""
    path = Path(path)
    if path.is_file() or (path / TRAINER_FILE).is_file():
        return path
    if path.is_dir() and (found := latest_checkpoint(path)) is not None:
        return found
    raise UserError(f"no checkpoint at {path}; train one with `python train.py` or give a run's --out-dir, one of "
                    f"its {CHECKPOINTS_DIR}/step_* folders or a single-file checkpoint")


# ---------------------------------------------------------------------------------------------------------------
# Reading.

def read_trainer_state(location: Path) -> dict:
    """A checkpoint's state apart from its tensors' (a single file holds the tensors too)."""
    return _load_file(location if location.is_file() else location / TRAINER_FILE)


def load_checkpoint(path: str | Path, with_optimizer: bool = True) -> dict:
    """The single-file form of the checkpoint at path (see checkpoint_location), read on this process alone."""
    location = checkpoint_location(path)
    state = read_trainer_state(location)
    if location.is_dir():
        tensors = _read_tensors(location, ("model", "optimizer") if with_optimizer else ("model",))
        state["model"] = tensors["model"]
        if with_optimizer:
            state["optimizer"] = {"state": tensors["optimizer"]["state"],
                                  "param_groups": state["optimizer_param_groups"]}
        del state["optimizer_param_groups"]
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise UserError(f"{location} is not a checkpoint written by train.py (it lacks the model and its config)")
    return state


def restore(location: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer]) -> None:
    """Loads a checkpoint's model and optimizer state into this run's (every rank calls it, each reading its own
    part: the checkpoint's world size need not be this one's)."""
    if location.is_file():  # the single-file form holds full tensors, optimizer state keyed by parameter index
        state = read_trainer_state(location)
        model.load_state_dict(state["model"])
        optimizers[0].load_state_dict(state["optimizer"])
        return
    model_state, optimizer_state = get_state_dict(model, optimizers)
    tensors = {"model": model_state, "optimizer": {"state": optimizer_state["state"]}}
    try:
        dcp.load(tensors, storage_reader=_SafeReader(location), no_dist=not dist.is_initialized())
    except UNREADABLE:
        raise UserError(f"{location} is not a readable checkpoint (a file in it is missing, truncated or corrupt); "
                        "resume from another one or start over with --overwrite") from None
    set_state_dict(model, optimizers, model_state_dict=tensors["model"],
                   optim_state_dict={"state": tensors["optimizer"]["state"],
                                     "param_groups": read_trainer_state(location)["optimizer_param_groups"]})


def _read_tensors(folder: Path, parts: tuple[str, ...]) -> dict:
    """The named parts of a step folder's tensors, as nested dicts of full tensors, read by this process alone."""
    reader = _SafeReader(folder)
    try:
        metadata = reader.read_metadata()
    except pickle.UnpicklingError as e:
        raise UserError(f"{folder} is not a readable checkpoint: {e}") from None
    except UNREADABLE:
        raise UserError(f"{folder} is not a readable checkpoint (its .metadata is missing, truncated or corrupt)") \
            from None
    tensors: dict = {}
    for key, path in metadata.planner_data.items():
        if path[0] in parts:
            info = metadata.state_dict_metadata[key]
            node = tensors
            for name in path[:-1]:
                node = node.setdefault(name, {})
            node[path[-1]] = torch.empty(info.size, dtype=info.properties.dtype)
    try:
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    except UNREADABLE:
        raise UserError(f"{folder} is not a readable checkpoint (a file in it is missing, truncated or corrupt)") \
            from None
    return tensors


def _load_file(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; train one with `python train.py` or give its path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError):
        # torch's own message is long and suggests weights_only=False, which we never want a user to do.
        raise UserError(f"{path} is not a readable checkpoint: the file is truncated or corrupt, or was not "
                        "written by train.py") from None


class _MetadataUnpickler(pickle.Unpickler):
    """Builds torch.distributed.checkpoint's metadata (its data classes and enums, sizes, dtypes, paths) and
    nothing else: pickle.load would call whatever the file names."""
    MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
               "torch.distributed.checkpoint.planner")
    NAMES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
             ("collections", "OrderedDict")}

    def find_class(self, module, name):
        found = super().find_class(module, name)
        data_type = isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum))
        if ((module in self.MODULES and data_type) or (module, name) in self.NAMES
                or (module == "torch" and isinstance(found, torch.dtype))):
            return found
        raise pickle.UnpicklingError(f"checkpoint metadata names {module}.{name}, which is not checkpoint metadata")


class _SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


# ---------------------------------------------------------------------------------------------------------------
# Writing.

class CheckpointWriter:
    """Writes a run's checkpoints into OUT_DIR/checkpoints/, keeping the last `keep`. Asynchronously, save() returns
    once the state is copied (to host memory) and the files are written by a background thread while training goes
    on; a save waits for the one before it, and finish() for the last."""

    def __init__(self, out_dir: str | Path, world: distributed.World, keep: int, asynchronous: bool,
                 last: tuple[int, Path] | None = None):
        """last: (step, location) of the checkpoint the run resumed from."""
        self.out_dir, self.root = Path(out_dir), Path(out_dir) / CHECKPOINTS_DIR
        self.world, self.keep, self.asynchronous = world, keep, asynchronous
        self._pending: tuple[Future, Path, int] | None = None  # (write, its folder, its step)
        # The last complete checkpoint, written or resumed from.
        self.last_step, self.last_path = last if last is not None else (None, None)
        if world.is_main:  # parts of a write that a killed process left unfinished
            for partial in self.root.glob(".step_*"):
                shutil.rmtree(partial)
        distributed.barrier(world)

    def save(self, step: int, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
             trainer_state: dict) -> None:
        """Every rank calls it, with the same step; only rank 0's trainer_state is written."""
        self.finish()
        model_state, optimizer_state = get_state_dict(model, optimizers)
        tensors = {"model": model_state, "optimizer": {"state": optimizer_state["state"]}}
        folder = self.root / f".{step_folder_name(step)}"
        if self.world.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            with self._reporting_full_disk(folder, step), atomic_file(folder / TRAINER_FILE) as f:
                torch.save({**trainer_state, "optimizer_param_groups": optimizer_state["param_groups"]}, f)
        where = dict(checkpoint_id=folder, process_group=distributed.checkpoint_group(),
                     no_dist=not self.world.distributed)
        if self.asynchronous:
            self._pending = (dcp.async_save(tensors, **where), folder, step)
            return
        with self._reporting_full_disk(folder, step):
            dcp.save(tensors, **where)
        self._complete(folder, step)

    def poll(self) -> None:
        """Completes a background write that has ended (so that `latest` names it as soon as possible)."""
        if self._pending is not None and self._pending[0].done():
            self.finish()

    def finish(self) -> None:
        """Waits for the write under way, if any, and completes it."""
        if self._pending is None:
            return
        write, folder, step = self._pending
        self._pending = None
        with self._reporting_full_disk(folder, step):
            write.result()
        self._complete(folder, step)

    def _complete(self, folder: Path, step: int) -> None:
        if self.world.is_main:
            final = self.root / step_folder_name(step)
            if final.exists():  # a step replayed after a restart from an earlier checkpoint
                shutil.rmtree(final)
            folder.rename(final)
            with atomic_file(self.root / LATEST_FILE) as f:
                f.write(f"{final.name}\n".encode())
            complete = sorted((p for p in self.root.iterdir() if STEP_FOLDER.fullmatch(p.name)),
                              key=lambda p: int(p.name.removeprefix("step_")))
            for old in complete[:-self.keep]:
                shutil.rmtree(old)
        self.last_step, self.last_path = step, self.root / step_folder_name(step)

    def describe_last(self) -> str:
        if self.last_step is None:
            return "no checkpoint was written"
        return (f"the last checkpoint, {self.last_path}, holds step {self.last_step}: continue from it with --resume "
                f"--out-dir {self.out_dir}")

    @contextlib.contextmanager
    def _reporting_full_disk(self, folder: Path, step: int):
        """Removes what a failed write left of folder, and reports a full disk in one line."""
        try:
            yield
        except BaseException as e:  # torch.distributed.checkpoint's errors are BaseExceptions
            if self.world.is_main:
                shutil.rmtree(folder, ignore_errors=True)
            failures = getattr(e, "failures", {})  # a CheckpointException's, by rank: (error, its traceback)
            if not (disk_full(e) or any(disk_full(failure[0]) for failure in failures.values())):
                raise
            raise UserError(f"the disk is full: no space left in {self.root} for the checkpoint of step {step}; "
                            f"{self.describe_last()} once there is space") from None


def save_checkpoint(path: str | Path, payload: dict) -> None:
    """Writes the single-file form (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        torch.save(payload, f)


# ---------------------------------------------------------------------------------------------------------------
# The tokenizer a checkpoint carries, and checks on what it holds.

def pack_tokenizer(tokenizer: Tokenizer | HuggingFaceTokenizer) -> dict:
    """The tokenizer itself, for a checkpoint: it then samples anywhere, whatever becomes of the dataset."""
    return {"model": torch.frombuffer(bytearray(tokenizer.model), dtype=torch.uint8), "source": tokenizer.origin,
            "vocab_size": tokenizer.vocab_size, "kind": tokenizer.kind, "eot_id": tokenizer.eot_id}


def tokenizer_bytes(ckpt: dict) -> bytes | None:
    """The tokenizer file a checkpoint carries (None in one written before checkpoints carried it)."""
    packed = ckpt.get("tokenizer", {}).get("model")
    return None if packed is None else packed.numpy().tobytes()


def unpack_tokenizer(ckpt: dict, checkpoint_path: str | Path) -> Tokenizer | HuggingFaceTokenizer:
    data = tokenizer_bytes(ckpt)
    packed = ckpt.get("tokenizer", {})
    if data is not None:  # a checkpoint written before Hugging Face tokenizers carries a sentencepiece model
        return tokenizer_from_bytes(packed.get("kind", Tokenizer.kind), data, f"the tokenizer in {checkpoint_path}",
                                    packed.get("eot_id"))
    path = packed.get("path")  # an older checkpoint names the dataset's tokenizer file instead
    if path is None:
        raise UserError(f"{checkpoint_path} carries no tokenizer; pass the one its model was trained with "
                        "(--tokenizer PATH/tokenizer.model)")
    if not Path(path).is_file():
        raise UserError(f"the checkpoint's tokenizer {path} is missing; pass --tokenizer PATH/tokenizer.model")
    return Tokenizer(path)


def nonfinite_weights(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors in a state dict that hold inf or nan (of a sharded tensor, this
    process's shard)."""
    local = (t.to_local() if isinstance(t, DTensor) else t for t in state.values())
    return [name for name, t in zip(state, local) if t.is_floating_point() and not torch.isfinite(t).all()]


@contextlib.contextmanager
def interrupts_deferred():
    """A Ctrl-C (SIGINT) inside this block takes effect when the block ends, as it would have outside it (by default
    a KeyboardInterrupt): what the block writes is then whole, and so is the run's record of it."""
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        signal.raise_signal(signal.SIGINT)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tritongpt.checkpoint",
                                     description="Write a checkpoint in its single-file form, for one process.")
    parser.add_argument("checkpoint", help="a run's --out-dir (its latest checkpoint), or one of its step folders")
    parser.add_argument("--to", required=True, metavar="FILE", help="the file to write (replaced atomically)")
    parser.add_argument("--weights-only", action="store_true", help="leave out the optimizer state (a third of the "
                        "size, enough to sample, export or fine-tune from)")
    args = parser.parse_args(argv)
    state = load_checkpoint(args.checkpoint, with_optimizer=not args.weights_only)
    save_checkpoint(args.to, state)
    print(f"wrote step {state['iter_num']} of {checkpoint_location(args.checkpoint)} to {args.to}")


if __name__ == "__main__":
    from tritongpt.options import run_main
    run_main(main)
