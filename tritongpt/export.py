"""Export a checkpoint as a Hugging Face transformers GPT-2 directory.

    python -m tritongpt.export RUN_OR_CKPT --to DIR

DIR then holds config.json, model.safetensors (the head tied to the token embedding, as GPT-2's),
generation_config.json (the end-of-text token) and the tokenizer: tokenizer.json, which encodes and decodes every
text as the checkpoint's own tokenizer does, and tokenizer_config.json. transformers loads it with no network:
AutoModelForCausalLM.from_pretrained(DIR) and AutoTokenizer.from_pretrained(DIR). A model trained without biases
gets zero ones, as GPT-2's class has them. DIR is written whole or not at all: the files go to a temporary directory
beside it, renamed into place once complete.
"""
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from tritongpt.checkpoint import load_checkpoint, nonfinite_weights, tokenizer_bytes, unpack_tokenizer
from tritongpt.data.tokenizer import hugging_face_dependency, load_tokenizer
from tritongpt.errors import UserError
from tritongpt.model.gpt2_import import CONV1D_SUFFIXES
from tritongpt.options import option, parse_options, run_main

TIED_HEAD = "lm_head.weight"  # GPT-2 ties it to transformer.wte.weight, so the file holds that one only
# The LayerNorms and matmuls of each block (transformer.h.N.), and the final LayerNorm: the modules with biases.
BLOCK_MODULES = ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")


def export(checkpoint: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Writes the checkpoint's model and tokenizer (or the tokenizer at `tokenizer`, for a checkpoint that carries
    none) to out_dir as a transformers GPT-2 directory; returns out_dir."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"--to {out_dir} already exists and is not an empty directory; pass a new one (or remove it)")
    ckpt = load_checkpoint(checkpoint, with_optimizer=False)
    if broken := nonfinite_weights(ckpt["model"]):
        raise UserError(f"{checkpoint} holds inf or nan weights ({broken[0]}, ...): its training diverged; export a "
                        "checkpoint of a healthy run")
    config = ckpt["model_config"]
    tok = load_tokenizer(tokenizer) if tokenizer else unpack_tokenizer(ckpt, checkpoint)
    if tokenizer and tokenizer_bytes(ckpt) not in (None, tok.model):
        raise UserError(f"tokenizer {tok.origin} is not the one {checkpoint} was trained with; leave out --tokenizer "
                        "to export the checkpoint's own")
    if tok.vocab_size != config["vocab_size"]:
        raise UserError(f"tokenizer {tok.origin} has {tok.vocab_size} tokens but the model has "
                        f"{config['vocab_size']}; pass the tokenizer it was trained with (--tokenizer)")
    tokenizer_json = tok.huggingface_json()
    eot = json_token(tokenizer_json, tok.eot_id)

    save_file = hugging_face_dependency("safetensors.torch").save_file
    temp = out_dir.parent / f".{out_dir.name}.{os.getpid()}.tmp"
    try:
        temp.mkdir(parents=True)
        save_file(gpt2_state_dict(ckpt["model"], config), str(temp / "model.safetensors"), metadata={"format": "pt"})
        write_json(temp / "config.json", gpt2_config(config, tok.eot_id))
        write_json(temp / "generation_config.json", {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id})
        (temp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        # The generic class, which runs tokenizer.json as it is; clean-up would drop spaces before punctuation.
        write_json(temp / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": eot, "eos_token": eot,
            "model_max_length": config["block_size"], "clean_up_tokenization_spaces": False})
        if out_dir.exists():
            out_dir.rmdir()  # empty, as checked above
        temp.rename(out_dir)
    except OSError as e:
        raise UserError(f"cannot write {out_dir} ({e.strerror}); pass a --to where there is room and you may "
                        "write") from None
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return out_dir


def gpt2_state_dict(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Our state dict in GPT2LMHeadModel's layout: the matmul weights transposed (its Conv1D stores them
    (in, out)), zero biases where the model has none, and the tied head left out."""
    out = {}
    for name, value in state.items():
        if name == TIED_HEAD:
            continue
        out[name] = (value.t() if name.endswith(CONV1D_SUFFIXES) else value).contiguous()
    if not config["bias"]:
        modules = [f"transformer.h.{i}.{m}" for i in range(config["n_layer"]) for m in BLOCK_MODULES]
        for module in [*modules, "transformer.ln_f"]:
            weight = state[f"{module}.weight"]
            out[f"{module}.bias"] = torch.zeros(weight.shape[0], dtype=weight.dtype)
    return out


def gpt2_config(config: dict, eot_id: int) -> dict:
    """transformers' GPT2Config for our model's shape (the hidden layer 4 x n_embd wide, tanh-approximated GELU,
    LayerNorm epsilon 1e-5: GPT-2's own)."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config["vocab_size"],
        "n_positions": config["block_size"], "n_embd": config["n_embd"], "n_layer": config["n_layer"],
        "n_head": config["n_head"], "n_inner": None, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        # Our dropout acts on the embeddings and each sub-layer's output, never on the attention weights.
        "embd_pdrop": config["dropout"], "resid_pdrop": config["dropout"], "attn_pdrop": 0.0,
        "bos_token_id": eot_id, "eos_token_id": eot_id, "tie_word_embeddings": True,
    }


def json_token(tokenizer_json: str, token_id: int) -> str:
    """The text of a token in a tokenizer.json: its special tokens, then its vocabulary."""
    spec = json.loads(tokenizer_json)
    for token in spec.get("added_tokens", []):
        if token["id"] == token_id:
            return token["content"]
    vocab = spec["model"]["vocab"]
    if isinstance(vocab, list):  # a unigram model: [piece, score] pairs in id order
        return vocab[token_id][0]
    return next(piece for piece, i in vocab.items() if i == token_id)


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n")


@dataclass(frozen=True)
class ExportOptions:
    checkpoint: tuple[str, ...] = option((), "the run directory (--out-dir of train.py) or checkpoint file to export",
                                         positional=True, metavar="RUN_OR_CKPT")
    to: str | None = option(None, "the directory to write; it must not exist yet, or be empty", metavar="DIR")
    tokenizer: str | None = option(None, "the tokenizer to export with the model, for a checkpoint that carries none: "
                                   "a sentencepiece .model file, or a Hugging Face tokenizer directory",
                                   metavar="PATH")


def main(argv: list[str] | None = None) -> None:
    opts, _ = parse_options(ExportOptions, __doc__.split("\n\n")[0], argv, with_config_file=False)
    if len(opts.checkpoint) != 1 or not opts.to:
        raise UserError("give one checkpoint and where to write it: python -m tritongpt.export RUN_OR_CKPT --to DIR")
    out_dir = export(opts.checkpoint[0], opts.to, opts.tokenizer)
    print(f"wrote {out_dir}: load it with transformers' AutoModelForCausalLM.from_pretrained({str(out_dir)!r}) and "
          f"AutoTokenizer.from_pretrained({str(out_dir)!r})")


if __name__ == "__main__":
    run_main(main)
