"""Sample text from a checkpoint written by train.py, printing tokens as they come.

The samples are drawn as one batch: the first is printed as it is generated, the others once all are done.

    python sample.py --prompt "def fibonacci(n):" --num-samples 3 --max-new-tokens 200
"""
from dataclasses import dataclass
from pathlib import Path

import torch

from tritongpt.data.tokenizer import HuggingFaceTokenizer, Tokenizer, load_tokenizer
from tritongpt.model import GPT, GPTConfig
from tritongpt.checkpoint import load_checkpoint, nonfinite_weights, tokenizer_bytes, unpack_tokenizer
from tritongpt.device import autocast, compute_dtype, impl_choices, resolve_device, resolve_ops
from tritongpt.errors import UserError
from tritongpt.options import option, parse_options, run_main
from tritongpt.textgen import prompt_ids, stream_text


@dataclass(frozen=True)
class SampleOptions:
    checkpoint: str = option("out", "a run's --out-dir (its latest checkpoint), one of its checkpoints/step_* "
                             "folders, or a single-file checkpoint",
                             metavar="PATH", group="sampling")
    prompt: str = option("", "text to continue (empty: start a new document)")
    prompt_file: str | None = option(None, "read the prompt from this file instead", metavar="FILE")
    num_samples: int = option(1, "how many samples to draw (as one batch)")
    max_new_tokens: int = option(200, "tokens to generate per sample (fewer if the document ends)")
    temperature: float = option(0.8, "softmax temperature; 0 always picks the most likely token", metavar="T")
    top_k: int | None = option(200, "sample among the k most likely tokens only; none for all", metavar="K")
    top_p: float | None = option(None, "sample among the most likely tokens whose probability reaches p; none for all",
                                 metavar="P")
    seed: int = option(1337, "random seed", metavar="SEED")
    tokenizer: str | None = option(None, "tokenizer to use instead of the one the checkpoint carries: a "
                                   "sentencepiece .model file, or a Hugging Face tokenizer directory or tokenizer.json",
                                   metavar="PATH")
    force_tokenizer: bool = option(False, "use --tokenizer although it differs from the one the checkpoint carries")
    device: str = option("auto", "auto, cpu, cuda or cuda:N", metavar="DEVICE", group="system")
    dtype: str = option("auto", "auto is bfloat16 on CUDA where supported, float32 on CPU",
                        choices=("auto", "float32", "bfloat16", "float16"), metavar="DTYPE")
    attention: str = option("auto", "attention implementation; auto is triton on CUDA, torch on CPU",
                            choices=impl_choices("attention"), metavar="IMPL")
    layernorm: str = option("auto", "LayerNorm implementation; auto as above", choices=impl_choices("layernorm"),
                            metavar="IMPL")
    mlp: str = option("auto", "MLP implementation; auto as above", choices=impl_choices("mlp"), metavar="IMPL")


def main(argv: list[str] | None = None) -> None:
    opts, _ = parse_options(SampleOptions, __doc__.splitlines()[0], argv, with_config_file=False)
    check_sampling_options(opts)
    prompt = read_prompt(opts)
    device = resolve_device(opts.device)
    dtype = compute_dtype(opts.dtype, device)

    ckpt = load_checkpoint(opts.checkpoint, with_optimizer=False)
    ops = resolve_ops(opts, device)
    config = GPTConfig.from_dict({**ckpt["model_config"], **ops})
    tokenizer = read_tokenizer(opts, ckpt, config.vocab_size)
    if broken := nonfinite_weights(ckpt["model"]):
        raise UserError(f"{opts.checkpoint} holds inf or nan weights ({broken[0]}, ...): its training diverged; "
                        "sample from a checkpoint of a healthy run")
    model = GPT(config)
    model.load_state_dict(ckpt["model"])
    model.to(device).eval()
    if device.type == "cpu":
        model.column_major_()

    context = prompt_ids(tokenizer, prompt, config.block_size)
    generator = torch.Generator(device).manual_seed(opts.seed)
    if opts.num_samples > 1:
        print("--- sample 1 ---")
    print(prompt, end="", flush=True)
    with autocast(dtype, device):
        texts = stream_text(model, tokenizer, context, opts.max_new_tokens, device, num_samples=opts.num_samples,
                            temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p, generator=generator)
    for i, text in enumerate(texts[1:], start=2):
        print(f"--- sample {i} ---")
        print(prompt + text)


def check_sampling_options(opts: SampleOptions) -> None:
    if opts.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {opts.num_samples}")
    if opts.max_new_tokens < 0:
        raise UserError(f"--max-new-tokens must be 0 or more, got {opts.max_new_tokens}")
    if opts.temperature < 0:
        raise UserError(f"--temperature must be 0 or more, got {opts.temperature}")
    if opts.top_k is not None and opts.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {opts.top_k}")
    if opts.top_p is not None and not 0 < opts.top_p <= 1:
        raise UserError(f"--top-p must be in (0, 1], got {opts.top_p}")
    if opts.prompt and opts.prompt_file:
        raise UserError("give --prompt or --prompt-file, not both")


def read_tokenizer(opts: SampleOptions, ckpt: dict, vocab_size: int) -> Tokenizer | HuggingFaceTokenizer:
    """The checkpoint's tokenizer, or --tokenizer: one of the model's vocabulary size, and the checkpoint's own
    unless --force-tokenizer (another tokenizer of the same size maps the model's tokens to other text)."""
    tokenizer = load_tokenizer(opts.tokenizer) if opts.tokenizer else unpack_tokenizer(ckpt, opts.checkpoint)
    if tokenizer.vocab_size != vocab_size:
        raise UserError(f"tokenizer {tokenizer.origin} has {tokenizer.vocab_size} tokens but the checkpoint's model "
                        f"has {vocab_size}; pass the tokenizer the model was trained with (--tokenizer)")
    trained_with = tokenizer_bytes(ckpt)
    if opts.tokenizer and trained_with not in (None, tokenizer.model) and not opts.force_tokenizer:
        raise UserError(f"tokenizer {tokenizer.origin} is not the one {opts.checkpoint} was trained with, so its "
                        "text would be garbage; leave out --tokenizer to use the checkpoint's own, or add "
                        "--force-tokenizer to use it anyway")
    return tokenizer


def read_prompt(opts: SampleOptions) -> str:
    if opts.prompt_file is None:
        return opts.prompt
    path = Path(opts.prompt_file)
    if not path.is_file():
        raise UserError(f"prompt file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompt file {path} is not UTF-8 text")


if __name__ == "__main__":
    run_main(main)
