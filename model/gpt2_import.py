"""Load the weights of a Hugging Face GPT-2 checkpoint from local files, so a user can fine-tune GPT-2 here.

Offline only: a directory saved by `save_pretrained` (config.json with model.safetensors or pytorch_model.bin), or a
state-dict file. `transformers` is not needed; `safetensors` is imported only to read a .safetensors file.
"""
import json
from pathlib import Path

import torch

from tritongpt.model.config import GPTConfig
from tritongpt.model.gpt import GPT

# Hugging Face's GPT-2 stores these as Conv1D weights, (in_features, out_features): nn.Linear wants the transpose.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def gpt2_config(path: str | Path, **ops) -> GPTConfig:
    """The shape of the GPT-2 in a save_pretrained directory, from its config.json; `ops` (attention=, layernorm=,
    mlp=) choose the implementations."""
    path = Path(path)
    if path.is_file():
        if not _holds_weights(path):
            raise ValueError(f"{path} is not a GPT-2 checkpoint: give the directory save_pretrained wrote "
                             "(config.json beside model.safetensors or pytorch_model.bin)")
        raise ValueError(f"{path} is a bare state dict, which does not say the model's shape: give the "
                         "save_pretrained directory (config.json beside the weights)")
    if not path.is_dir():
        raise FileNotFoundError(f"no GPT-2 checkpoint at {path}: give a save_pretrained directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json: it is not a GPT-2 checkpoint directory (give the "
                                "one save_pretrained wrote)")
    _weights_file(path)  # present, or the error says what is missing
    return _config_from_hf(path / "config.json", ops)


def load_gpt2(path: str | Path, config: GPTConfig | None = None, **ops) -> GPT:
    """A GPT with the weights at path. The shape comes from `config` when given (required for a bare state-dict
    file), else from the directory's config.json; `ops` (attention=, layernorm=, mlp=) choose the
    implementations. A config with a shorter block_size keeps the first block_size position embeddings."""
    path = Path(path)
    if path.is_dir():
        weights = _weights_file(path)
        config = config or _config_from_hf(path / "config.json", ops)
        state = _read_state_dict(weights)
    elif path.is_file():
        if config is None:
            raise ValueError(f"{path} is a bare state dict: pass the GPTConfig it was saved with")
        state = _read_state_dict(path)
    else:
        raise FileNotFoundError(f"no GPT-2 checkpoint at {path}: give a save_pretrained directory or a state-dict file")

    model = GPT(config)
    ours = model.state_dict()
    converted = {}
    for key, value in state.items():
        name = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        if name not in ours:  # the causal-mask buffers older checkpoints carry
            continue
        converted[name] = value.t() if name.endswith(CONV1D_SUFFIXES) else value
    wpe = converted.get("transformer.wpe.weight")
    if wpe is not None and config.block_size < len(wpe):
        converted["transformer.wpe.weight"] = wpe[:config.block_size]
    converted.setdefault("lm_head.weight", converted["transformer.wte.weight"])  # tied
    missing = set(ours) - set(converted)
    if missing:
        raise ValueError(f"{path} lacks {len(missing)} GPT-2 weights, e.g. {sorted(missing)[:3]}")
    for name, value in converted.items():
        if value.shape != ours[name].shape:
            raise ValueError(f"{path}: {name} has shape {tuple(value.shape)}, the config expects "
                             f"{tuple(ours[name].shape)}")
    model.load_state_dict(converted)
    return model


def _config_from_hf(config_file: Path, ops: dict) -> GPTConfig:
    try:
        hf = json.loads(config_file.read_text())
    except ValueError as e:
        raise ValueError(f"{config_file} is not JSON ({e}): it is not a GPT-2 config.json") from None
    if hf.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{config_file} describes a {hf['model_type']!r} model, not GPT-2")
    try:
        return GPTConfig(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                         n_head=hf["n_head"], n_embd=hf["n_embd"], dropout=0.0, bias=True, **ops)
    except KeyError as e:
        raise ValueError(f"{config_file} lacks {e}: it is not a GPT-2 config.json")


def _weights_file(directory: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"{directory} has neither model.safetensors nor pytorch_model.bin")


def _holds_weights(file: Path) -> bool:
    """Whether file starts as a state-dict file does: a zip (torch.save), a pickle (torch.save's older format) or a
    safetensors header (its length, then the JSON)."""
    with open(file, "rb") as f:
        head = f.read(9)
    return head.startswith((b"PK\x03\x04", b"\x80")) or head[8:9] == b"{"


def _read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(file))
    return torch.load(file, map_location="cpu", weights_only=True)
