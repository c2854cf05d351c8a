"""Checkpoints: written atomically (a temporary file, then a rename), so an interrupted write never damages the
previous checkpoint; read with torch.load(weights_only=True), so loading one cannot run code."""
import contextlib
import pickle
import signal
import zipfile
from pathlib import Path

import torch

from tritongpt.data.tokenizer import HuggingFaceTokenizer, Tokenizer, tokenizer_from_bytes
from tritongpt.errors import UserError
from tritongpt.files import atomic_file

CHECKPOINT_FILE = "ckpt.pt"
REQUIRED_KEYS = ("model", "model_config", "iter_num")


def save_checkpoint(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as f:
        torch.save(payload, f)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """The checkpoint at path, or in the directory path (its ckpt.pt)."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; train one with `python train.py` or give its path")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError, OSError):
        # torch's own message is long and suggests weights_only=False, which we never want a user to do.
        raise UserError(f"{path} is not a readable checkpoint: the file is truncated or corrupt, or was not "
                        "written by train.py") from None
    if not isinstance(payload, dict) or any(k not in payload for k in REQUIRED_KEYS):
        raise UserError(f"{path} is not a checkpoint written by train.py (it lacks the model and its config)")
    return payload


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
    """The names of the floating-point tensors in a state dict that hold inf or nan."""
    return [name for name, t in state.items() if t.is_floating_point() and not torch.isfinite(t).all()]


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
