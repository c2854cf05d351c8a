"""Checkpoints: written atomically (a temporary file, then a rename), so an interrupted write never damages the
previous checkpoint; read with torch.load(weights_only=True), so loading one cannot run code."""
import os
import pickle
import zipfile
from pathlib import Path

import torch

from training.errors import UserError

REQUIRED_KEYS = ("model", "model_config", "iter_num")


def save_checkpoint(path: str | Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    path = Path(path)
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
