"""Train a GPT on a tokenized dataset, on one device or many under torchrun.

    python train.py                                         # the default corpus, a small model, then a sample
    torchrun --standalone --nproc_per_node=8 train.py --model gpt2 --data-dir data/mycorpus
"""
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from data.loader import TokenWindows
from data.tokenizer import Tokenizer
from model import GPT, PRESETS, GPTConfig, load_gpt2, preset
from training import distributed
from training.device import IMPL_CHOICES, autocast as autocast_context, compute_dtype, resolve_ops
from training.checkpoint import load_checkpoint, save_checkpoint
from training.errors import UserError
from training.metrics import MetricsLogger
from training.options import option, parse_options, run_main
from training.schedule import learning_rate
from training.textgen import prompt_ids, stream_text

DEFAULT_DATA_DIR = "data/default"


@dataclass(frozen=True)
class TrainOptions:
    # Data and output
    data_dir: str = option(DEFAULT_DATA_DIR, "dataset folder written by data/prepare.py (the default corpus is "
                           "prepared on first use)")
    out_dir: str = option("out", "where the checkpoint (ckpt.pt), metrics.jsonl and loss_curve.png go")
    resume: bool = option(False, "continue from OUT_DIR/ckpt.pt; flags given now override its options")
    # Model
    model: str = option("auto", "shape preset; auto is mini on CPU, small on GPU", choices=("auto", *PRESETS))
    n_layer: int | None = option(None, "override the preset's layer count")
    n_head: int | None = option(None, "override the preset's head count")
    n_embd: int | None = option(None, "override the preset's embedding width")
    block_size: int | None = option(None, "override the preset's context length")
    dropout: float = option(0.0, "dropout on embeddings and sub-layer outputs")
    bias: bool = option(True, "biases in Linear layers and LayerNorms, as GPT-2")
    attention: str = option("auto", "attention implementation; auto is triton on CUDA, torch on CPU",
                            choices=IMPL_CHOICES)
    layernorm: str = option("auto", "LayerNorm implementation; auto as above", choices=IMPL_CHOICES)
    mlp: str = option("auto", "MLP implementation; auto as above", choices=IMPL_CHOICES)
    init_from: str | None = option(None, "start from a local Hugging Face GPT-2 directory instead of random weights "
                                   "(the dataset's tokenizer must have its vocabulary size)")
    # Optimisation
    batch_size: int = option(16, "sequences per micro-batch, per process")
    grad_accum: int | None = option(None, "micro-batches per optimizer step, over all processes together (a "
                                    "multiple of the process count); none means one per process")
    max_iters: int = option(300, "optimizer steps in the whole run")
    learning_rate: float = option(1e-3, "peak learning rate")
    min_lr: float | None = option(None, "floor of the cosine decay; none means learning_rate / 10")
    warmup_iters: int = option(30, "steps of linear warm-up")
    lr_decay_iters: int | None = option(None, "step at which the cosine reaches min_lr; none means max_iters")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip the gradient norm to this; 0 turns clipping off")
    # Evaluation, logging, checkpoints
    eval_interval: int = option(100, "steps between train/val loss estimates")
    eval_iters: int = option(20, "micro-batches per loss estimate")
    log_interval: int = option(10, "steps between log lines")
    ckpt_interval: int | None = option(None, "steps between checkpoints; none means eval_interval")
    sample_tokens: int = option(200, "tokens of text to sample at the end; 0 for none")
    # System
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = option("auto", "auto is bfloat16 on CUDA where supported (else float16 with a GradScaler), "
                        "float32 on CPU", choices=("auto", "float32", "bfloat16", "float16"))
    compile: bool = option(False, "torch.compile the model")
    seed: int = option(1337, "seed for initialisation, data order and dropout")
    # Weights & Biases
    wandb: bool = option(False, "log to Weights & Biases (metrics.jsonl is always written)")
    wandb_project: str = option("tritongpt", "W&B project")
    wandb_run_name: str | None = option(None, "W&B run name")
    wandb_entity: str | None = option(None, "W&B entity (user or team)")
    wandb_mode: str = option("online", "W&B mode; without a network or login, online falls back to offline",
                             choices=("online", "offline", "disabled"))


@record  # under torchrun, a rank's crash shows in the job's failure summary with its traceback
def main(argv: list[str] | None = None) -> None:
    opts, given = parse_options(TrainOptions, __doc__.splitlines()[0], argv)
    world = distributed.init_world(opts.device)
    try:
        train(opts, given, world)
    finally:
        distributed.close_world(world)


def train(opts: TrainOptions, given: set[str], world: distributed.World) -> None:
    out_dir = Path(opts.out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    ckpt = None
    if opts.resume:
        ckpt = load_checkpoint(ckpt_path)
        saved = {k: v for k, v in ckpt["options"].items() if k in TrainOptions.__dataclass_fields__}
        opts = TrainOptions(**{**saved, **{k: getattr(opts, k) for k in given}})
    check_options(opts)
    say = print if world.is_main else (lambda *a, **k: None)

    # Data and tokenizer
    meta = load_dataset_meta(Path(opts.data_dir), world)
    tokenizer = Tokenizer(Path(opts.data_dir) / meta["tokenizer"])

    # Model
    device = world.device
    config = model_config(opts, meta["vocab_size"], device, ckpt)
    if opts.init_from and ckpt is None:
        try:
            model = load_gpt2(opts.init_from, attention=config.attention, layernorm=config.layernorm, mlp=config.mlp)
        except (OSError, ValueError) as e:
            raise UserError(f"--init-from: {e}") from None
        config = model.config
        if config.vocab_size != meta["vocab_size"]:
            raise UserError(f"--init-from {opts.init_from} has a {config.vocab_size}-token vocabulary but the "
                            f"dataset's tokenizer has {meta['vocab_size']}; prepare the data with that tokenizer")
    else:
        torch.manual_seed(opts.seed)
        model = GPT(config)
    model.to(device)
    ptdtype = compute_dtype(opts.dtype, device)
    autocast = autocast_context(ptdtype, device)
    scaler = torch.amp.GradScaler(device.type, enabled=ptdtype == torch.float16)
    optimizer = model.configure_optimizers(opts.weight_decay, opts.learning_rate, (opts.beta1, opts.beta2),
                                           device.type)

    grad_accum = opts.grad_accum or world.size
    train_data, val_data = (TokenWindows(Path(opts.data_dir) / f"{split}.bin", meta["dtype"], config.block_size,
                                         opts.batch_size, grad_accum, world.rank, world.size, opts.seed, device)
                            for split in ("train", "val"))

    iter_num = 0
    torch.manual_seed(opts.seed + world.rank)  # dropout differs per rank; the data order does not depend on it
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        train_data.load_state_dict(ckpt["data"])
        iter_num = ckpt["iter_num"]
        restore_rng(ckpt["rng"], world)

    compiled = torch.compile(model) if opts.compile else model
    net = distributed.wrap_model(compiled, world)

    tokens_per_step = opts.batch_size * grad_accum * config.block_size
    say(f"model: {model.num_params() / 1e6:.2f}M parameters, {config.n_layer} layers, {config.n_head} heads, "
        f"width {config.n_embd}, context {config.block_size}; ops: attention={config.attention}, "
        f"layernorm={config.layernorm}, mlp={config.mlp}; {device}, {str(ptdtype).removeprefix('torch.')}")
    say(f"global batch: {opts.batch_size} sequences x {grad_accum} micro-batches x "
        f"{config.block_size} tokens = {tokens_per_step:,} tokens per step "
        f"({world.size} process{'es' if world.size > 1 else ''} x {grad_accum // world.size} "
        f"micro-batch{'es' if grad_accum // world.size > 1 else ''} each)")

    logger = MetricsLogger(
        out_dir, config={"options": dataclasses.asdict(opts), "model": dataclasses.asdict(config),
                         "world_size": world.size, "tokens_per_step": tokens_per_step},
        wandb=opts.wandb, project=opts.wandb_project, run_name=opts.wandb_run_name, entity=opts.wandb_entity,
        mode=opts.wandb_mode, resume_run_id=ckpt.get("wandb_run_id") if ckpt else None,
        resume_step=iter_num + 1 if ckpt else None,  # step iter_num itself was logged before the checkpoint
        enabled=world.is_main)

    def evaluate() -> dict[str, float]:
        compiled.eval()
        losses = {}
        with torch.no_grad():
            for split, data in (("train", train_data), ("val", val_data)):
                # (sum of batch losses, batch count): ranks may hold unequal shares of the evaluation set.
                total = torch.zeros(2, device=device)
                for starts in data.eval_batches(opts.eval_iters):
                    x, y = data.fetch(starts)
                    with autocast:
                        total[0] += compiled(x, y)[1].float()
                    total[1] += 1
                loss_sum, count = distributed.sum_across_ranks(total, world).tolist()
                losses[split] = loss_sum / count
        compiled.train()
        say(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
        logger.log(iter_num, {"val/loss": losses["val"], "train/eval_loss": losses["train"]})
        return losses

    def checkpoint() -> None:
        rng = distributed.gather_objects(rng_state(device), world)
        if world.is_main:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "model_config": dataclasses.asdict(config), "options": dataclasses.asdict(opts),
                "tokenizer": {"path": str(tokenizer.path.resolve()), "vocab_size": tokenizer.vocab_size},
                "iter_num": iter_num, "data": train_data.state_dict(), "rng": rng,
                "wandb_run_id": logger.run_id,
            })
        distributed.barrier(world)  # no rank runs ahead of (or exits before) the write

    ckpt_interval = opts.ckpt_interval or opts.eval_interval
    micro_steps = grad_accum // world.size
    if iter_num == 0:
        evaluate()
    bar = tqdm(total=opts.max_iters, initial=iter_num, disable=not world.is_main or None, unit="step",
               dynamic_ncols=True)
    last_log_time, steps_since_log = time.perf_counter(), 0
    while iter_num < opts.max_iters:
        lr = learning_rate(iter_num, opts.learning_rate, opts.min_lr or opts.learning_rate / 10,
                           opts.warmup_iters, opts.lr_decay_iters or opts.max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr

        step_windows = train_data.next_step()
        loss_sum = torch.zeros((), device=device)
        for micro, starts in enumerate(step_windows):
            x, y = train_data.fetch(starts)
            with distributed.gradient_sync(net, sync=micro == micro_steps - 1), autocast:
                _, loss = net(x, y)
                loss = loss / micro_steps
            scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), opts.grad_clip or math.inf)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        steps_since_log += 1
        bar.update()

        if iter_num % opts.log_interval == 0 or iter_num == opts.max_iters:
            train_loss = distributed.sum_across_ranks(loss_sum, world).item() / world.size  # waits for the device
            now = time.perf_counter()
            step_time = (now - last_log_time) / steps_since_log
            last_log_time, steps_since_log = now, 0
            tokens_per_sec = tokens_per_step / step_time
            mfu = model.estimate_mfu(tokens_per_sec / world.size, device)
            metrics = {"train/loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(),
                       "tokens_per_sec": tokens_per_sec, "mfu": mfu, "step_time_ms": step_time * 1e3}
            if device.type == "cuda":
                metrics["gpu_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            logger.log(iter_num, metrics)
            mfu_text = "unknown" if mfu is None else f"{mfu:.1%}"
            (tqdm.write if world.is_main else (lambda s: None))(
                f"step {iter_num}/{opts.max_iters} | loss {train_loss:.4f} | lr {lr:.2e} | "
                f"{step_time * 1e3:.1f} ms | {tokens_per_sec:,.0f} tok/s | mfu {mfu_text}")
        if iter_num % opts.eval_interval == 0 or iter_num == opts.max_iters:
            evaluate()
        if iter_num % ckpt_interval == 0 or iter_num == opts.max_iters:
            checkpoint()
    bar.close()
    logger.finish()
    if world.is_main and opts.sample_tokens > 0:
        say(f"checkpoint: {ckpt_path}\n--- sample ---")
        model.eval()
        with autocast:
            stream_text(model, tokenizer, prompt_ids(tokenizer, "", config.block_size), opts.sample_tokens,
                        device, temperature=0.8, top_k=200,
                        generator=torch.Generator(device).manual_seed(opts.seed))


# The smallest value each numeric option takes (options that are none stay unchecked).
OPTION_MINIMUMS = dict(batch_size=1, max_iters=1, eval_interval=1, eval_iters=1, log_interval=1, grad_accum=1,
                       ckpt_interval=1, lr_decay_iters=1, n_layer=1, n_head=1, n_embd=1, block_size=1, warmup_iters=0,
                       learning_rate=0, weight_decay=0, grad_clip=0, sample_tokens=0, dropout=0)


def check_options(opts: TrainOptions) -> None:
    for name, lowest in OPTION_MINIMUMS.items():
        value = getattr(opts, name)
        if value is not None and value < lowest:
            raise UserError(f"--{name.replace('_', '-')} must be at least {lowest}, got {value}")


def load_dataset_meta(data_dir: Path, world: distributed.World) -> dict:
    """The dataset's meta.json, preparing the default corpus on first use (on rank 0, the others waiting)."""
    meta_file = data_dir / "meta.json"
    if not meta_file.is_file() and data_dir == Path(DEFAULT_DATA_DIR):
        if world.is_main:
            from data.prepare import prepare
            print(f"preparing the default corpus into {data_dir} (once)")
            prepare(out_dir=data_dir)
        distributed.barrier(world)
    if not meta_file.is_file():
        raise UserError(f"no dataset in {data_dir} (meta.json missing); build one with "
                        f"`python data/prepare.py YOUR_TEXT --out-dir {data_dir}`")
    return json.loads(meta_file.read_text())


def model_config(opts: TrainOptions, vocab_size: int, device: torch.device, ckpt: dict | None) -> GPTConfig:
    ops = resolve_ops(opts, device)
    if ckpt is not None:
        config = GPTConfig.from_dict({**ckpt["model_config"], **ops})
        if config.vocab_size != vocab_size:
            raise UserError(f"the checkpoint's model has a {config.vocab_size}-token vocabulary but the dataset in "
                            f"{opts.data_dir} has {vocab_size}; resume with the dataset it was trained on")
        return config
    name = opts.model if opts.model != "auto" else ("small" if device.type == "cuda" else "mini")
    shape = {k: getattr(opts, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(opts, k)}
    try:
        return preset(name, vocab_size=vocab_size, dropout=opts.dropout, bias=opts.bias, **shape, **ops)
    except ValueError as e:
        raise UserError(str(e))


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(states: list[dict], world: distributed.World) -> None:
    if len(states) != world.size:
        if world.is_main:
            print(f"note: the checkpoint was written by {len(states)} processes and this run has {world.size}; "
                  "dropout's random stream restarts from the seed")
        return
    state = states[world.rank]
    torch.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], world.device)


if __name__ == "__main__":
    run_main(main)
