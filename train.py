"""Train a GPT on a tokenized dataset, on one device or many under torchrun.

    python train.py                                         # the default corpus, a small model, then a sample
    torchrun --standalone --nproc_per_node=8 train.py --model gpt2 --data-dir data/mycorpus
"""
import dataclasses
import json
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from data.loader import TokenWindows
from data.prepare import DEFAULT_VOCAB_SIZE, prepare
from data.tokenizer import Tokenizer
from model import GPT, PRESETS, GPTConfig, gpt2_config, load_gpt2, preset
from training import distributed
from training.checkpoint import (CHECKPOINT_FILE, load_checkpoint, nonfinite_weights, pack_tokenizer, save_checkpoint,
                                 tokenizer_bytes)
from training.device import IMPL_CHOICES, autocast, compute_dtype, resolve_ops
from training.errors import UserError
from training.loop import estimate_loss, train_step
from training.metrics import CONFIG_FILE, CURVE_FILE, METRICS_FILE, MetricsLogger
from training.options import option, parse_options, run_main
from training.schedule import learning_rate
from training.textgen import prompt_ids, stream_text

DEFAULT_DATA_DIR = "data/default"
RUN_FILES = (CHECKPOINT_FILE, METRICS_FILE, CONFIG_FILE, CURVE_FILE)  # a run's own files in OUT_DIR
# The model's shape: a checkpoint (--resume) or a GPT-2 directory (--init-from) fixes it.
SHAPE_OPTIONS = ("model", "n_layer", "n_head", "n_embd", "block_size", "bias")


@dataclass(frozen=True)
class TrainOptions:
    # Data and output
    data_dir: str = option(DEFAULT_DATA_DIR, "dataset folder written by data/prepare.py (the default corpus is "
                           "prepared on first use)")
    out_dir: str = option("out", "where the checkpoint (ckpt.pt), metrics.jsonl and loss_curve.png go")
    resume: bool = option(False, "continue the run in OUT_DIR from its ckpt.pt; flags given now override its "
                          "options, except the model's shape")
    overwrite: bool = option(False, "start a new run in OUT_DIR although it holds one, deleting that run's "
                             "checkpoint, metrics and plot first")
    # Model
    model: str = option("auto", "shape preset; auto is mini on CPU, small on GPU", choices=("auto", *PRESETS))
    n_layer: int | None = option(None, "override the preset's layer count")
    n_head: int | None = option(None, "override the preset's head count")
    n_embd: int | None = option(None, "override the preset's embedding width")
    block_size: int | None = option(None, "override the preset's context length (with --init-from: shorten "
                                    "GPT-2's)")
    dropout: float = option(0.0, "dropout on embeddings and sub-layer outputs")
    bias: bool = option(True, "biases in Linear layers and LayerNorms, as GPT-2 (--no-bias or --bias false "
                        "for none)")
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
    warmup_iters: int | None = option(None, "steps of linear warm-up; none means a tenth of max_iters")
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


def main(argv: list[str] | None = None) -> None:
    opts, given = parse_options(TrainOptions, __doc__.splitlines()[0], argv)
    world = distributed.world_from_env(opts.device)
    opts, config, ckpt = check_run(opts, given, world)  # every rank refuses a mistake alike, before talking
    distributed.join(world)
    try:
        train(opts, config, ckpt, world)
    finally:
        distributed.leave(world)


# ---------------------------------------------------------------------------------------------------------------
# Checks: every mistake is found here, before any process-group work and before anything is written.

def check_run(opts: "TrainOptions", given: set[str], world: distributed.World):
    """(options, model config, checkpoint to resume from or None), or a UserError."""
    out_dir = Path(opts.out_dir)
    ckpt = None
    if opts.resume:
        if opts.overwrite:
            raise UserError("give --resume (continue the run) or --overwrite (start over), not both")
        ckpt = load_checkpoint(out_dir / CHECKPOINT_FILE)
        opts = resumed_options(opts, given, ckpt)
    check_options(opts)
    if not opts.resume and not opts.overwrite and (held := [name for name in RUN_FILES if (out_dir / name).exists()]):
        raise UserError(f"{out_dir} already holds a run ({', '.join(held)}); continue it with --resume (and a "
                        "larger --max-iters), start over with --overwrite (deletes it), or pass another --out-dir")
    meta = dataset_meta(Path(opts.data_dir))
    # The default corpus, before its first use, gets prepare's default vocabulary.
    vocab_size = meta["vocab_size"] if meta else DEFAULT_VOCAB_SIZE
    config = model_config(opts, given, vocab_size, world.device, ckpt)
    compute_dtype(opts.dtype, world.device)  # refuses a dtype the device cannot compute in
    if meta is not None:
        check_dataset(opts, config, meta, ckpt, world)
    check_out_dir(out_dir)
    return opts, config, ckpt


def resumed_options(opts: "TrainOptions", given: set[str], ckpt: dict) -> "TrainOptions":
    """The checkpoint's options, overridden by those given now."""
    fixed = sorted(given & {*SHAPE_OPTIONS, "init_from"})
    if fixed:
        raise UserError(f"{flag(fixed[0])} cannot change a resumed run: its checkpoint fixes the model's shape; "
                        "drop it (or start a new run in another --out-dir)")
    saved = {k: v for k, v in ckpt["options"].items() if k in TrainOptions.__dataclass_fields__}
    opts = TrainOptions(**{**saved, **{k: getattr(opts, k) for k in given}, "overwrite": False})
    if opts.max_iters <= ckpt["iter_num"]:
        raise UserError(f"the run in {opts.out_dir} is already at step {ckpt['iter_num']} (--max-iters "
                        f"{opts.max_iters}); pass a larger --max-iters to train further")
    return opts


# The smallest value each numeric option takes (options that are none stay unchecked).
OPTION_MINIMUMS = dict(batch_size=1, max_iters=1, eval_interval=1, eval_iters=1, log_interval=1, grad_accum=1,
                       ckpt_interval=1, lr_decay_iters=1, n_layer=1, n_head=1, n_embd=1, block_size=1, warmup_iters=0,
                       weight_decay=0, grad_clip=0, sample_tokens=0, dropout=0, min_lr=0, beta1=0, beta2=0)


def check_options(opts: "TrainOptions") -> None:
    """Values the model, the optimizer or the schedule would refuse, or silently misuse. (Floats are finite:
    the option parser refuses nan and inf.)"""
    for name, lowest in OPTION_MINIMUMS.items():
        value = getattr(opts, name)
        if value is not None and value < lowest:
            raise UserError(f"{flag(name)} must be at least {lowest}, got {value}")
    if opts.learning_rate <= 0:
        raise UserError(f"--learning-rate must be above 0, got {opts.learning_rate}")
    for name in ("beta1", "beta2", "dropout"):
        if not getattr(opts, name) < 1:
            raise UserError(f"{flag(name)} must be below 1, got {getattr(opts, name)}")
    if opts.min_lr is not None and opts.min_lr > opts.learning_rate:
        raise UserError(f"--min-lr ({opts.min_lr}) must not exceed --learning-rate ({opts.learning_rate})")
    if warmup_iters(opts) > opts.max_iters:
        raise UserError(f"--warmup-iters ({opts.warmup_iters}) must not exceed --max-iters ({opts.max_iters})")
    if opts.lr_decay_iters is not None and opts.lr_decay_iters < warmup_iters(opts):
        raise UserError(f"--lr-decay-iters ({opts.lr_decay_iters}) must be at least the warm-up's "
                        f"{warmup_iters(opts)} steps")


def warmup_iters(opts: "TrainOptions") -> int:
    return opts.max_iters // 10 if opts.warmup_iters is None else opts.warmup_iters


def dataset_meta(data_dir: Path) -> dict | None:
    """The dataset's meta.json; None for the default corpus before its first use (it is prepared then)."""
    meta_file = data_dir / "meta.json"
    if not meta_file.is_file():
        if data_dir == Path(DEFAULT_DATA_DIR):
            return None
        raise UserError(f"no dataset in {data_dir} (meta.json missing); build one with "
                        f"`python data/prepare.py YOUR_TEXT --out-dir {data_dir}`")
    try:
        return json.loads(meta_file.read_text())
    except ValueError:
        raise UserError(f"{meta_file} is not valid JSON; rebuild the dataset with `python data/prepare.py`") from None


def model_config(opts: "TrainOptions", given: set[str], vocab_size: int, device: torch.device,
                 ckpt: dict | None) -> GPTConfig:
    ops = resolve_ops(opts, device)
    if ckpt is not None:
        return GPTConfig.from_dict({**ckpt["model_config"], **ops, "dropout": opts.dropout})
    if opts.init_from:
        return gpt2_init_config(opts, given, ops)
    name = opts.model if opts.model != "auto" else ("small" if device.type == "cuda" else "mini")
    shape = {k: getattr(opts, k) for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(opts, k)}
    try:
        return preset(name, vocab_size=vocab_size, dropout=opts.dropout, bias=opts.bias, **shape, **ops)
    except ValueError as e:
        raise UserError(str(e)) from None


def gpt2_init_config(opts: "TrainOptions", given: set[str], ops: dict) -> GPTConfig:
    """--init-from's shape, as its config.json says, with a shorter context if --block-size asks for one."""
    fixed = sorted(given & set(SHAPE_OPTIONS) - {"block_size"})
    if fixed:
        raise UserError(f"{flag(fixed[0])} cannot be used with --init-from: the GPT-2 checkpoint fixes the model's "
                        "shape; drop it")
    try:
        config = gpt2_config(opts.init_from, **ops)
    except (OSError, ValueError) as e:
        raise UserError(f"--init-from: {e}") from None
    if opts.block_size is not None:
        if opts.block_size > config.block_size:
            raise UserError(f"--block-size {opts.block_size} is longer than the {config.block_size} positions of "
                            f"{opts.init_from}; pass {config.block_size} or less")
        config = replace(config, block_size=opts.block_size)
    return replace(config, dropout=opts.dropout)


def check_dataset(opts: "TrainOptions", config: GPTConfig, meta: dict, ckpt: dict | None,
                  world: distributed.World) -> tuple[TokenWindows, TokenWindows]:
    """The dataset's (train, val) windows, once it is known to fit the model: the same vocabulary (and,
    resuming, the checkpoint's own tokenizer), and splits long enough for the context."""
    source = "--init-from " + opts.init_from if opts.init_from and ckpt is None else "the checkpoint's model"
    if config.vocab_size != meta["vocab_size"]:
        raise UserError(f"{source} has a {config.vocab_size}-token vocabulary but the dataset in {opts.data_dir} "
                        f"has {meta['vocab_size']}; use a dataset prepared with that model's tokenizer")
    if ckpt is not None and tokenizer_bytes(ckpt) is not None:
        if (Path(opts.data_dir) / meta["tokenizer"]).read_bytes() != tokenizer_bytes(ckpt):
            raise UserError(f"the dataset in {opts.data_dir} was tokenized with another tokenizer than the run in "
                            f"{opts.out_dir}; resume with the dataset it was trained on (--data-dir)")
    return open_data(opts, config, meta, world)  # refuses splits shorter than a window, or a bad --grad-accum


def check_out_dir(out_dir: Path) -> None:
    """OUT_DIR is a directory this process can write in (it is created if missing)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir} is a file, not a directory; pass another --out-dir")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out_dir):
            pass
    except OSError as e:
        raise UserError(f"cannot write in --out-dir {out_dir} ({e.strerror}); pass one you can write to") from None


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ---------------------------------------------------------------------------------------------------------------
# Set-up: options -> data, model, optimizer, logger.

@dataclass
class Run:
    """What the training loop works with."""
    opts: TrainOptions
    world: distributed.World
    config: GPTConfig
    model: GPT                       # the bare model: its state dict, generation, MFU
    eval_model: torch.nn.Module      # the model as evaluation calls it (compiled when --compile)
    net: torch.nn.Module             # the model as the training step calls it (also DDP-wrapped under torchrun)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dtype: torch.dtype               # what autocast computes in
    autocast: torch.autocast
    train_data: TokenWindows
    val_data: TokenWindows
    tokenizer: Tokenizer
    logger: MetricsLogger
    step: int                        # optimizer steps taken
    checkpoint_step: int | None      # the step of the last checkpoint written (or resumed from)
    first_nonfinite_step: torch.Tensor  # on the device: the first step whose loss or gradient was inf/nan, else a
                                        # step past the end (tracked without waiting for the device)

    @property
    def checkpoint_path(self) -> Path:
        return Path(self.opts.out_dir) / CHECKPOINT_FILE

    def say(self, text: str) -> None:
        if self.world.is_main:
            tqdm.write(text)  # above the progress bar, never through it


def set_up(opts: TrainOptions, config: GPTConfig, ckpt: dict | None, world: distributed.World) -> Run:
    meta = ensure_dataset(opts, world)
    if ckpt is None and not opts.init_from:
        config = replace(config, vocab_size=meta["vocab_size"])
    train_data, val_data = check_dataset(opts, config, meta, ckpt, world)
    tokenizer = Tokenizer(Path(opts.data_dir) / meta["tokenizer"])
    if opts.init_from and ckpt is None:
        model = load_gpt2(opts.init_from, config)
    else:
        torch.manual_seed(opts.seed)
        model = GPT(config)
    model.to(world.device)
    dtype = compute_dtype(opts.dtype, world.device)
    scaler = torch.amp.GradScaler(world.device.type, enabled=dtype == torch.float16)
    optimizer = model.configure_optimizers(opts.weight_decay, opts.learning_rate, (opts.beta1, opts.beta2),
                                           world.device.type)
    torch.manual_seed(opts.seed + world.rank)  # dropout differs per rank; the data order does not depend on it
    step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        train_data.load_state_dict(ckpt["data"])
        step = ckpt["iter_num"]
        restore_rng(ckpt["rng"], world)
    if opts.overwrite and world.is_main:
        for name in RUN_FILES:
            (Path(opts.out_dir) / name).unlink(missing_ok=True)
    eval_model = torch.compile(model) if opts.compile else model
    logger = MetricsLogger(
        opts.out_dir, config={"options": dataclasses.asdict(opts), "model": dataclasses.asdict(config),
                              "world_size": world.size, "tokens_per_step": tokens_per_step(opts, config, world)},
        wandb=opts.wandb, project=opts.wandb_project, run_name=opts.wandb_run_name, entity=opts.wandb_entity,
        mode=opts.wandb_mode, resume_run_id=ckpt.get("wandb_run_id") if ckpt else None,
        resume_step=step + 1 if ckpt else None,  # the checkpoint's own step was logged before it was written
        enabled=world.is_main)
    return Run(opts, world, config, model, eval_model, distributed.wrap_model(eval_model, world), optimizer, scaler,
               dtype, autocast(dtype, world.device), train_data, val_data, tokenizer, logger, step,
               step if ckpt else None, torch.tensor(opts.max_iters + 1, device=world.device))


def ensure_dataset(opts: TrainOptions, world: distributed.World) -> dict:
    """The dataset's meta.json, preparing the default corpus on first use (on rank 0, the others waiting)."""
    data_dir = Path(opts.data_dir)
    if not (data_dir / "meta.json").is_file():
        if world.is_main:
            print(f"preparing the default corpus into {data_dir} (once)")
            prepare(out_dir=data_dir)
        distributed.barrier(world)
    return json.loads((data_dir / "meta.json").read_text())


def open_data(opts: TrainOptions, config: GPTConfig, meta: dict,
              world: distributed.World) -> tuple[TokenWindows, TokenWindows]:
    grad_accum = opts.grad_accum or world.size
    return tuple(TokenWindows(Path(opts.data_dir) / f"{split}.bin", meta["dtype"], config.block_size, opts.batch_size,
                              grad_accum, world.rank, world.size, opts.seed, world.device)
                 for split in ("train", "val"))


def tokens_per_step(opts: TrainOptions, config: GPTConfig, world: distributed.World) -> int:
    return opts.batch_size * (opts.grad_accum or world.size) * config.block_size


def plural(n: int, word: str, words: str) -> str:
    return f"{n} {word if n == 1 else words}"


def describe(run: Run) -> None:
    c, opts, world = run.config, run.opts, run.world
    grad_accum = opts.grad_accum or world.size
    run.say(f"model: {run.model.num_params() / 1e6:.2f}M parameters, {c.n_layer} layers, {c.n_head} heads, "
            f"width {c.n_embd}, context {c.block_size}; ops: attention={c.attention}, layernorm={c.layernorm}, "
            f"mlp={c.mlp}; {world.device}, {str(run.dtype).removeprefix('torch.')}")
    run.say(f"global batch: {plural(opts.batch_size, 'sequence', 'sequences')} x "
            f"{plural(grad_accum, 'micro-batch', 'micro-batches')} x {c.block_size} tokens = "
            f"{tokens_per_step(opts, c, world):,} tokens per step ({plural(world.size, 'process', 'processes')} x "
            f"{plural(grad_accum // world.size, 'micro-batch', 'micro-batches')} each)")
    if run.step:
        run.say(f"resuming from step {run.step} of {opts.max_iters} ({run.checkpoint_path})")


# ---------------------------------------------------------------------------------------------------------------
# The loop.

def train(opts: TrainOptions, config: GPTConfig, ckpt: dict | None, world: distributed.World) -> None:
    run = set_up(opts, config, ckpt, world)
    describe(run)
    try:
        loop(run)
    except KeyboardInterrupt:
        run.say(f"stopped at step {run.step}; {last_checkpoint(run)}")
        raise
    finally:
        run.logger.finish()
    if world.is_main and opts.sample_tokens > 0:
        closing_sample(run)


def loop(run: Run) -> None:
    opts = run.opts
    if run.step == 0:
        evaluate(run)
    bar = tqdm(total=opts.max_iters, initial=run.step, disable=not run.world.is_main or None, unit="step",
               dynamic_ncols=True)
    micro_steps = (opts.grad_accum or run.world.size) // run.world.size
    clock = (time.perf_counter(), run.step)  # (time, step) at the last log line
    while run.step < opts.max_iters:
        lr = learning_rate(run.step, opts.learning_rate, opts.min_lr or opts.learning_rate / 10,
                           warmup_iters(opts), opts.lr_decay_iters or opts.max_iters)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        micro_batches = (run.train_data.fetch(starts) for starts in run.train_data.next_step())
        loss, grad_norm = train_step(run.model, run.net, run.optimizer, run.scaler, micro_batches, micro_steps,
                                     run.autocast, opts.grad_clip)
        run.step += 1
        note_nonfinite(run, loss, grad_norm)
        bar.update()
        last = run.step == opts.max_iters
        if run.step % opts.log_interval == 0 or last:
            clock = log_progress(run, loss, grad_norm, lr, clock)
        if run.step % opts.eval_interval == 0 or last:
            evaluate(run)
        if run.step % (opts.ckpt_interval or opts.eval_interval) == 0 or last:
            save(run)
    bar.close()


def note_nonfinite(run: Run, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """Remember the first step whose loss or gradient norm was inf or nan. With fp16's GradScaler an inf gradient
    is routine (the scaler skips that step and lowers its scale), so only the loss counts then."""
    finite = torch.isfinite(loss) & (torch.isfinite(grad_norm) | run.scaler.is_enabled())
    run.first_nonfinite_step = torch.where(finite, run.first_nonfinite_step,
                                           run.first_nonfinite_step.clamp(max=run.step))


def stop_if_diverged(run: Run) -> None:
    """Ends the run with one line when any rank saw a non-finite loss or gradient (a wait for the device)."""
    step = int(distributed.min_across_ranks(run.first_nonfinite_step, run.world))
    if step <= run.opts.max_iters:
        raise UserError(f"training diverged: the loss or gradient norm became inf or nan at step {step}; "
                        f"{last_checkpoint(run)} (try a lower --learning-rate)")


def last_checkpoint(run: Run) -> str:
    if run.checkpoint_step is None:
        return "no checkpoint was written"
    return (f"the last checkpoint, {run.checkpoint_path}, holds step {run.checkpoint_step}: continue from it with "
            f"--resume --out-dir {run.opts.out_dir}")


def log_progress(run: Run, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float,
                 clock: tuple[float, int]) -> tuple[float, int]:
    stop_if_diverged(run)
    now = time.perf_counter()
    step_time = (now - clock[0]) / (run.step - clock[1])
    train_loss = distributed.sum_across_ranks(loss, run.world).item() / run.world.size
    tokens_per_sec = tokens_per_step(run.opts, run.config, run.world) / step_time
    mfu = run.model.estimate_mfu(tokens_per_sec / run.world.size, run.world.device)
    metrics = {"train/loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_sec": tokens_per_sec,
               "mfu": mfu, "step_time_ms": step_time * 1e3}
    if run.world.device.type == "cuda":
        metrics["gpu_peak_mem_gib"] = torch.cuda.max_memory_allocated(run.world.device) / 2**30
    run.logger.log(run.step, metrics)
    mfu_text = "" if mfu is None else f" | mfu {mfu:.1%}"  # unknown on a CPU or an unlisted GPU: left out
    run.say(f"step {run.step}/{run.opts.max_iters} | loss {train_loss:.4f} | lr {lr:.2e} | {step_time * 1e3:.1f} ms | "
            f"{tokens_per_sec:,.0f} tok/s{mfu_text}")
    return now, run.step


def evaluate(run: Run) -> None:
    stop_if_diverged(run)
    losses = {}
    for split, data in (("train", run.train_data), ("val", run.val_data)):
        batches = (data.fetch(starts) for starts in data.eval_batches(run.opts.eval_iters))
        losses[split] = estimate_loss(run.eval_model, batches, run.autocast, run.world)
    run.say(f"step {run.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
    run.logger.log(run.step, {"val/loss": losses["val"], "train/eval_loss": losses["train"]})


def save(run: Run) -> None:
    """Writes the checkpoint (atomically), after making sure that nothing non-finite replaces a good one."""
    stop_if_diverged(run)
    state = run.model.state_dict()
    if nonfinite_weights(state):
        raise UserError(f"training diverged: the weights at step {run.step} hold inf or nan; {last_checkpoint(run)} "
                        "(try a lower --learning-rate)")
    rng = distributed.gather_objects(rng_state(run.world.device), run.world)
    if run.world.is_main:
        save_checkpoint(run.checkpoint_path, {
            "model": state, "optimizer": run.optimizer.state_dict(),
            "scaler": run.scaler.state_dict(), "model_config": dataclasses.asdict(run.config),
            "options": dataclasses.asdict(run.opts), "tokenizer": pack_tokenizer(run.tokenizer),
            "iter_num": run.step, "data": run.train_data.state_dict(), "rng": rng,
            "wandb_run_id": run.logger.run_id,
        })
    distributed.barrier(run.world)  # no rank runs ahead of (or exits before) the write
    run.checkpoint_step = run.step


def closing_sample(run: Run) -> None:
    print(f"checkpoint: {run.checkpoint_path}\n--- sample ---")
    run.model.eval()
    with run.autocast:
        stream_text(run.model, run.tokenizer, prompt_ids(run.tokenizer, "", run.config.block_size),
                    run.opts.sample_tokens, run.world.device, temperature=0.8, top_k=200,
                    generator=torch.Generator(run.world.device).manual_seed(run.opts.seed))


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
    # Under torchrun, a rank's crash shows in the job's failure summary with its traceback; a user's mistake leaves
    # run_main as exit status 2, which record() passes on without a traceback.
    record(run_main)(main)
