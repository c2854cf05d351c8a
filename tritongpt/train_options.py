"""train.py's options, and the checks that refuse a mistaken run before it starts: every rank runs them before
any process-group work, and before anything is written."""
import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from tritongpt import distributed
from tritongpt.checkpoint import CHECKPOINTS_DIR, SINGLE_FILE, latest_checkpoint, read_trainer_state, tokenizer_bytes
from tritongpt.data.loader import TokenWindows
from tritongpt.data.prepare import DEFAULT_VOCAB_SIZE
from tritongpt.data.tokenizer import HuggingFaceTokenizer, load_tokenizer, same_tokens
from tritongpt.device import compute_dtype, gib, impl_choices, memory_available, resolve_ops
from tritongpt.errors import UserError
from tritongpt.files import DirectoryLock
from tritongpt.model import PRESETS, GPTConfig, gpt2_config, preset, training_memory
from tritongpt.optim import MUON_LR_ADJUSTMENTS, OPTIMIZERS
from tritongpt.options import flag, option
from tritongpt.plot import CONFIG_FILE, CURVES_FILE, METRICS_FILE

DEFAULT_DATA_DIR = "data/default"
DATASET_KEYS = ("vocab_size", "dtype", "tokenizer", "train_tokens", "val_tokens")  # what training reads of meta.json
RUN_FILES = (CHECKPOINTS_DIR, SINGLE_FILE, METRICS_FILE, CONFIG_FILE, CURVES_FILE)  # a run's own files in OUT_DIR
# Muon's peak rate with the "original" shape adjustment (a matrix's step of spectral norm about lr x sqrt(fan-out /
# fan-in), whatever the width): on the default run 0.01 ended lower than 0.015, 0.02 and 0.05, and alike with 0.005.
DEFAULT_MUON_LR = 0.01
# The model's shape: a checkpoint (--resume) or a GPT-2 directory (--init-from) fixes it.
SHAPE_OPTIONS = ("model", "n_layer", "n_head", "n_embd", "block_size", "bias")


@dataclass(frozen=True)
class TrainOptions:
    data_dir: str = option(DEFAULT_DATA_DIR, "dataset folder written by data/prepare.py (the default corpus is "
                           "prepared on first use)", metavar="DIR", group="data and output")
    out_dir: str = option("out", "where the checkpoints (checkpoints/), metrics.jsonl and training_curves.png go",
                          metavar="DIR")
    resume: bool = option(False, "continue the run in OUT_DIR from its latest checkpoint; flags given now override "
                          "its options, except the model's shape (a torchrun restart resumes without it)")
    overwrite: bool = option(False, "start a new run in OUT_DIR although it holds one, deleting that run's "
                             "checkpoint, metrics and plot first")
    model: str = option("auto", "shape preset; auto is mini on CPU, small on GPU", choices=("auto", *PRESETS),
                        metavar="PRESET", group="model")
    n_layer: int | None = option(None, "override the preset's layer count")
    n_head: int | None = option(None, "override the preset's head count")
    n_embd: int | None = option(None, "override the preset's embedding width")
    block_size: int | None = option(None, "override the preset's context length (with --init-from: shorten "
                                    "GPT-2's)", metavar="TOKENS")
    dropout: float = option(0.0, "dropout on embeddings and sub-layer outputs", metavar="P")
    bias: bool = option(True, "biases in Linear layers and LayerNorms, as GPT-2 (--no-bias or --bias false "
                        "for none)")
    attention: str = option("auto", "attention implementation; auto is triton on CUDA, torch on CPU",
                            choices=impl_choices("attention"), metavar="IMPL")
    layernorm: str = option("auto", "LayerNorm implementation; auto as above", choices=impl_choices("layernorm"),
                            metavar="IMPL")
    mlp: str = option("auto", "MLP implementation; auto as above", choices=impl_choices("mlp"), metavar="IMPL")
    loss: str = option("auto", "LM head + cross-entropy implementation (triton: fused, without storing the "
                       "logits); auto as above", choices=impl_choices("loss"), metavar="IMPL")
    init_from: str | None = option(None, "start from a local Hugging Face GPT-2 directory instead of random weights "
                                   "(the dataset must be encoded with its tokenizer: prepare.py --tokenizer DIR)",
                                   metavar="DIR")
    batch_size: int = option(8, "sequences per micro-batch, per process", group="optimisation")
    grad_accum: int | None = option(None, "micro-batches per optimizer step, over all processes together (a "
                                    "multiple of the process count); none means one per process")
    max_iters: int = option(1200, "optimizer steps in the whole run", metavar="STEPS")
    learning_rate: float | None = option(None, "AdamW's peak learning rate; none means 6e-3 x 128 / n_embd (1e-3 at "
                                         "GPT-2's width) with adamw, twice that with muon (where AdamW trains the "
                                         "embeddings, gains and biases only), a twentieth of either with "
                                         "--init-from", metavar="LR")
    min_lr: float | None = option(None, "floor of the cosine decay; none means learning_rate / 10", metavar="LR")
    warmup_iters: int | None = option(None, "steps of linear warm-up; none means a tenth of max_iters with adamw, "
                                      "none with muon (whose orthogonalised steps have their size from the first)",
                                      metavar="STEPS")
    lr_decay_iters: int | None = option(None, "step at which the cosine reaches min_lr; none means max_iters",
                                        metavar="STEP")
    optimizer: str = option("muon", "muon for the 2-D weights inside the blocks with adamw for the rest "
                            "(embeddings, LayerNorms, biases), or adamw for every parameter", choices=OPTIMIZERS,
                            metavar="NAME")
    weight_decay: float = option(0.1, "AdamW weight decay on matrices")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    muon_lr: float | None = option(None, f"Muon's peak learning rate, scaled by the schedule as --learning-rate is; "
                                   f"none means {DEFAULT_MUON_LR:g}, a twentieth of that with "
                                   "--init-from", metavar="LR")
    muon_momentum: float = option(0.9, "Muon's momentum (Nesterov)")
    muon_ns_steps: int = option(5, "Newton-Schulz iterations that orthogonalise Muon's step", metavar="STEPS")
    muon_adjust_lr: str = option("original", "how Muon scales a matrix's rate by its shape A x B: original by "
                                 "sqrt(max(1, A/B)), match_rms_adamw by 0.2 sqrt(max(A, B)) (AdamW's rates then "
                                 "carry over)", choices=MUON_LR_ADJUSTMENTS, metavar="RULE")
    muon_weight_decay: float = option(0.0, "Muon's weight decay (decoupled: each step shrinks the matrices by "
                                      "lr x this)")
    grad_clip: float = option(1.0, "clip the gradient norm to this; 0 turns clipping off", metavar="NORM")
    eval_interval: int = option(200, "steps between train/val loss estimates", metavar="STEPS",
                                group="evaluation, logging and checkpoints")
    eval_iters: int = option(20, "micro-batches per loss estimate")
    log_interval: int = option(10, "steps between log lines", metavar="STEPS")
    ckpt_interval: int | None = option(None, "steps between checkpoints; none means eval_interval", metavar="STEPS")
    keep_checkpoints: int = option(1, "how many of the latest checkpoints to keep", metavar="K")
    async_checkpoint: bool = option(True, "write checkpoints in the background while training goes on (they cost "
                                    "a copy of the model and optimizer state in host memory meanwhile)")
    sample_tokens: int = option(200, "tokens of text to sample at the end; 0 for none")
    sample_prompt: str | None = option(None, "text the closing sample continues (empty: a new document); none "
                                       "means def on the default corpus, a new document on any other", metavar="TEXT")
    device: str = option("auto", "auto, cpu, cuda or cuda:N", metavar="DEVICE", group="system")
    dtype: str = option("auto", "auto is bfloat16 on CUDA where supported (else float16 with a GradScaler), "
                        "float32 on CPU", choices=("auto", "float32", "bfloat16", "float16"), metavar="DTYPE")
    compile: bool = option(False, "torch.compile the model")
    parallel: str = option("ddp", "how torchrun's processes share the model: ddp keeps all of it on each (weights, "
                           "gradients and AdamW state: 16 bytes a parameter); fsdp shards it across them (FSDP2, "
                           "16 / processes; run alone, a world of one)", choices=distributed.PARALLELISMS,
                           metavar="MODE")
    replicate: int = option(1, "with --parallel fsdp: groups that each hold a whole sharded copy (HSDP), e.g. one "
                            "per node; the processes are split into this many groups of consecutive ranks",
                            metavar="GROUPS")
    fsdp_reshard_after_forward: bool = option(True, "with --parallel fsdp: free each layer's gathered weights after "
                                              "its forward and gather them again for its backward (false: keep "
                                              "them, more memory, fewer gathers)")
    seed: int = option(1337, "seed for initialisation, data order and dropout", metavar="SEED")
    wandb: bool = option(False, "log to Weights & Biases (metrics.jsonl is always written)",
                         group="Weights & Biases")
    wandb_project: str = option("tritongpt", "W&B project", metavar="PROJECT")
    wandb_run_name: str | None = option(None, "W&B run name", metavar="NAME")
    wandb_entity: str | None = option(None, "W&B entity (user or team)", metavar="ENTITY")
    wandb_mode: str = option("online", "W&B mode; without a network or login, online falls back to offline",
                             choices=("online", "offline", "disabled"), metavar="MODE")


def check_run(opts: TrainOptions, given: set[str], world: distributed.World, out_dir_lock: DirectoryLock):
    """(options, model config, the checkpoint to resume from or None, its trainer state or None), or a UserError.
    Rank 0 takes out_dir_lock before it reads what OUT_DIR holds, so no other run changes it meanwhile."""
    out_dir = Path(opts.out_dir)
    if out_dir.is_dir():
        hold_out_dir(out_dir, out_dir_lock, world)
    restarted = restarted_job(opts, out_dir)
    if restarted:  # torchrun restarted this job's workers: the run in OUT_DIR is this job's own
        opts = replace(opts, resume=latest_checkpoint(out_dir) is not None, overwrite=False)
    location = ckpt = None
    if opts.resume:
        if opts.overwrite:
            raise UserError("give --resume (continue the run) or --overwrite (start over), not both")
        location = latest_checkpoint(out_dir)
        if location is None:
            if stub := run_files(out_dir):
                raise UserError(f"the run in {out_dir} stopped before its first checkpoint (it left only "
                                f"{', '.join(stub)}): there is nothing to resume; start it again without --resume")
            raise UserError(f"there is no run in {out_dir} to resume; start one without --resume (or pass the "
                            "--out-dir of the run to continue)")
        ckpt = read_trainer_state(location)
        opts = resumed_options(opts, given, ckpt, restarted)
    check_options(opts)
    check_parallel(opts, given, world)
    meta = dataset_meta(Path(opts.data_dir))
    # The default corpus, before its first use, gets prepare's default vocabulary.
    vocab_size = meta["vocab_size"] if meta else DEFAULT_VOCAB_SIZE
    config = model_config(opts, given, vocab_size, world.device, ckpt)
    if opts.learning_rate is None:
        opts = replace(opts, learning_rate=default_learning_rate(config, opts.optimizer,
                                                                 fine_tuning=bool(opts.init_from)))
    if opts.muon_lr is None:
        opts = replace(opts, muon_lr=DEFAULT_MUON_LR / 20 if opts.init_from else DEFAULT_MUON_LR)
    check_learning_rates(opts)
    if opts.sample_prompt is None:  # the default corpus is mostly Python; another may have no `def` in it at all
        opts = replace(opts, sample_prompt="def" if Path(opts.data_dir) == Path(DEFAULT_DATA_DIR) else "")
    dtype = compute_dtype(opts.dtype, world.device)  # refuses a dtype the device cannot compute in
    if opts.parallel == "fsdp" and dtype == torch.float16:
        raise UserError("--parallel fsdp computes in bfloat16 or float32, not float16 (whose GradScaler it does not "
                        "support); pass --dtype bfloat16 or --dtype float32")
    if meta is not None:
        check_dataset(opts, config, meta, ckpt, world)
    check_memory(opts, config, dtype, world)
    hold_out_dir(out_dir, out_dir_lock, world)
    if world.is_main and not out_dir_lock.supported:
        print(f"note: the file system of {out_dir} has no locks, so nothing stops another run from writing in it "
              "meanwhile; give each run its own --out-dir")
    if not opts.resume and not opts.overwrite and (held := run_files(out_dir)):
        if latest_checkpoint(out_dir) is not None and not restarted:
            raise UserError(f"{out_dir} already holds a run ({', '.join(held)}); continue it with --resume (and a "
                            "larger --max-iters), start over with --overwrite (deletes it), or pass another "
                            "--out-dir")
        if world.is_main:  # a run that stopped before its first checkpoint left nothing to continue
            print(f"note: {out_dir} holds no checkpoint, only {', '.join(held)} of a run that stopped before "
                  "writing one; this run starts over in it")
    return opts, config, location, ckpt


def restarted_job(opts: TrainOptions, out_dir: Path) -> bool:
    """Whether torchrun restarted this job's workers (after one failed) and OUT_DIR holds the job's own run, which
    then continues. A job is known by torchrun's id for it, which the run records in its config.json."""
    job, restarts = distributed.launch()
    if not restarts or not run_files(out_dir):
        return False
    try:
        recorded = json.loads((out_dir / CONFIG_FILE).read_text())["launch"]["job"]
    except (OSError, ValueError, KeyError, TypeError):
        recorded = None
    if job == "none":  # torchrun's id when the user gave none, alike for every job
        raise UserError(f"torchrun restarted the workers (restart {restarts}), but a job launched without --rdzv-id "
                        f"cannot tell its own run in {opts.out_dir} from another job's; give torchrun --rdzv-id with "
                        "an id unique to the job (a scheduler's job id) to resume after a restart by itself, or "
                        "launch again with --resume")
    if recorded != job:
        raise UserError(f"torchrun restarted the workers (restart {restarts}), but {opts.out_dir} holds another "
                        "job's run, which this job did not write; pass another --out-dir")
    return True


def run_files(out_dir: Path) -> list[str]:
    """The names of the run files OUT_DIR holds."""
    return [name for name in RUN_FILES if (out_dir / name).exists()]


def hold_out_dir(out_dir: Path, lock: DirectoryLock, world: distributed.World) -> None:
    """Makes sure OUT_DIR is a directory this process can write in, and (on rank 0, which alone writes there) that
    no other run is writing in it: from here on, it holds it."""
    check_out_dir(out_dir)
    if world.is_main and (holder := lock.acquire()):
        raise UserError(f"--out-dir {out_dir} is in use by another training run ({holder}); wait for it to end "
                        "(or stop it), or pass another --out-dir")


def check_memory(opts: TrainOptions, config: GPTConfig, dtype: torch.dtype, world: distributed.World) -> None:
    """Refuses shapes whose training surely cannot fit in the device's memory (a lower bound against the most the
    device offers, so that anything that might fit is tried)."""
    device = world.device
    need = training_memory(config, opts.batch_size, dtype.itemsize)
    if opts.parallel == "fsdp":  # each rank holds its shard of the weights, gradients and AdamW state
        need["weights, gradients and AdamW state"] //= world.size // opts.replicate
    have = memory_available(device)
    if sum(need.values()) > have:
        largest = max(need, key=need.get)
        raise UserError(f"this run needs at least {gib(sum(need.values()))} of memory ({largest}: "
                        f"{gib(need[largest])}), more than the {gib(have)} {device} has"
                        f"{' free' if device.type == 'cpu' else ''}; lower --batch-size (a larger --grad-accum "
                        "keeps the global batch), --block-size or the model's size")


def resumed_options(opts: TrainOptions, given: set[str], ckpt: dict, restarted: bool = False) -> TrainOptions:
    """The checkpoint's options, overridden by those given now (after a restart, the launch's own, which made the
    checkpoint: the model's shape among them)."""
    fixed = sorted(given & {*SHAPE_OPTIONS, "init_from"})
    if fixed and not restarted:
        raise UserError(f"{flag(fixed[0])} cannot change a resumed run: its checkpoint fixes the model's shape; "
                        "drop it (or start a new run in another --out-dir)")
    saved = {k: v for k, v in ckpt["options"].items() if k in TrainOptions.__dataclass_fields__}
    trained_with = saved.get("optimizer", "adamw")  # runs from before the option trained with AdamW
    if "optimizer" in given and opts.optimizer != trained_with:
        raise UserError(f"--optimizer cannot change a resumed run: its checkpoint holds {trained_with}'s state; drop "
                        "it (or start a new run in another --out-dir)")
    # OUT_DIR is where the checkpoint was found, whatever the run that wrote it was called.
    opts = TrainOptions(**{**saved, "optimizer": trained_with, **{k: getattr(opts, k) for k in given},
                           "out_dir": opts.out_dir, "resume": True, "overwrite": False})
    if opts.max_iters <= ckpt["iter_num"] and not restarted:  # a restart after the last step finishes at once
        raise UserError(f"the run in {opts.out_dir} is already at step {ckpt['iter_num']} (--max-iters "
                        f"{opts.max_iters}); pass a larger --max-iters to train further")
    return opts


def check_parallel(opts: TrainOptions, given: set[str], world: distributed.World) -> None:
    """The FSDP options fit --parallel and the number of processes."""
    if opts.parallel != "fsdp" and (fsdp_only := sorted(given & {"replicate", "fsdp_reshard_after_forward"})):
        raise UserError(f"{flag(fsdp_only[0])} applies to --parallel fsdp only; add --parallel fsdp or drop it")
    if world.size % opts.replicate:
        raise UserError(f"--replicate {opts.replicate} does not divide the {world.size} processes into equal groups; "
                        f"pass a divisor of {world.size}")


# The smallest value each numeric option takes (options that are none stay unchecked).
OPTION_MINIMUMS = dict(batch_size=1, max_iters=1, eval_interval=1, eval_iters=1, log_interval=1, grad_accum=1,
                       ckpt_interval=1, keep_checkpoints=1, lr_decay_iters=1, n_layer=1, n_head=1, n_embd=1,
                       block_size=1, warmup_iters=0, weight_decay=0, grad_clip=0, replicate=1, sample_tokens=0,
                       dropout=0, min_lr=0, beta1=0, beta2=0, muon_momentum=0, muon_ns_steps=1, muon_weight_decay=0)


MAX_NS_STEPS = 99


def check_options(opts: TrainOptions) -> None:
    """Values the model, the optimizer or the schedule would refuse, or silently misuse. (Floats are finite:
    the option parser refuses nan and inf.)"""
    for name, lowest in OPTION_MINIMUMS.items():
        value = getattr(opts, name)
        if value is not None and value < lowest:
            raise UserError(f"{flag(name)} must be at least {lowest}, got {value}")
    if opts.muon_ns_steps > MAX_NS_STEPS:  # torch.optim.Muon refuses more; a handful already orthogonalise
        raise UserError(f"--muon-ns-steps must be at most {MAX_NS_STEPS}, got {opts.muon_ns_steps}")
    for name in ("beta1", "beta2", "dropout", "muon_momentum"):
        if not getattr(opts, name) < 1:
            raise UserError(f"{flag(name)} must be below 1, got {getattr(opts, name)}")
    if warmup_iters(opts) > opts.max_iters:
        raise UserError(f"--warmup-iters ({opts.warmup_iters}) must not exceed --max-iters ({opts.max_iters})")
    if opts.lr_decay_iters is not None and opts.lr_decay_iters < warmup_iters(opts):
        raise UserError(f"--lr-decay-iters ({opts.lr_decay_iters}) must be at least the warm-up's "
                        f"{warmup_iters(opts)} steps")


def default_learning_rate(config: GPTConfig, optimizer: str, fine_tuning: bool) -> float:
    """AdamW's peak rate. Wider models take smaller steps: it falls as 1 / n_embd, from 6e-3 for the mini preset's 128
    (on the default run it beat 3e-3 and 1e-2 with AdamW alone) to 1e-3 at GPT-2's 768. Beside Muon, AdamW trains
    only the embeddings (the tied head among them), gains and biases, which take twice that (on the default run
    that ended 0.025 lower than 6e-3). Fine-tuning pretrained weights wants them kept close, hence a twentieth."""
    rate = 6e-3 * 128 / config.n_embd * (2 if optimizer == "muon" else 1)
    return rate / 20 if fine_tuning else rate


def check_learning_rates(opts: TrainOptions) -> None:
    if opts.learning_rate <= 0:
        raise UserError(f"--learning-rate must be above 0, got {opts.learning_rate}")
    if opts.muon_lr <= 0:
        raise UserError(f"--muon-lr must be above 0, got {opts.muon_lr}")
    if opts.min_lr is not None and opts.min_lr > opts.learning_rate:
        raise UserError(f"--min-lr ({opts.min_lr}) must not exceed --learning-rate ({opts.learning_rate})")


def warmup_iters(opts: TrainOptions) -> int:
    if opts.warmup_iters is not None:
        return opts.warmup_iters
    return 0 if opts.optimizer == "muon" else opts.max_iters // 10


def dataset_meta(data_dir: Path) -> dict | None:
    """The dataset's meta.json; None for the default corpus before its first use (it is prepared then)."""
    meta_file = data_dir / "meta.json"
    if not meta_file.is_file():
        if data_dir == Path(DEFAULT_DATA_DIR):
            return None
        raise UserError(f"no dataset in {data_dir} (meta.json missing); build one with "
                        f"`python data/prepare.py YOUR_TEXT --out-dir {data_dir}`")
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError:
        raise UserError(f"{meta_file} is not valid JSON; rebuild the dataset with `python data/prepare.py`") from None
    if missing := [key for key in DATASET_KEYS if not isinstance(meta, dict) or key not in meta]:
        raise UserError(f"{meta_file} lacks {', '.join(missing)}, so it was not written by data/prepare.py; rebuild "
                        "the dataset with `python data/prepare.py`")
    return meta


def model_config(opts: TrainOptions, given: set[str], vocab_size: int, device: torch.device,
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


def gpt2_init_config(opts: TrainOptions, given: set[str], ops: dict) -> GPTConfig:
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


def check_dataset(opts: TrainOptions, config: GPTConfig, meta: dict, ckpt: dict | None,
                  world: distributed.World) -> tuple[TokenWindows, TokenWindows]:
    """The dataset's (train, val) windows, once it is known to fit the model: the same vocabulary (and,
    resuming, the checkpoint's own tokenizer), and splits long enough for the context."""
    source = "--init-from " + opts.init_from if opts.init_from and ckpt is None else "the checkpoint's model"
    if config.vocab_size != meta["vocab_size"]:
        raise UserError(f"{source} has a {config.vocab_size}-token vocabulary but the dataset in {opts.data_dir} "
                        f"has {meta['vocab_size']}; use a dataset prepared with that model's tokenizer")
    if opts.init_from and ckpt is None:
        check_init_tokenizer(opts, meta)
    trained_with = tokenizer_bytes(ckpt) if ckpt is not None else None
    if trained_with is not None:
        if (Path(opts.data_dir) / meta["tokenizer"]).read_bytes() != trained_with:
            raise UserError(f"the dataset in {opts.data_dir} was tokenized with another tokenizer than the run in "
                            f"{opts.out_dir}; resume with the dataset it was trained on (--data-dir)")
    return open_data(opts, config, meta, world)  # refuses splits shorter than a window, or a bad --grad-accum


def check_init_tokenizer(opts: TrainOptions, meta: dict) -> None:
    """--init-from's embeddings stand for the tokens of its own tokenizer: the dataset must be encoded with that
    tokenizer, compared by content (another one of the same size would feed every embedding another token)."""
    remedy = (f"make a dataset with its tokenizer: `python data/prepare.py YOUR_TEXT --tokenizer {opts.init_from} "
              "--out-dir NEW_DIR`")
    try:
        theirs = HuggingFaceTokenizer(opts.init_from)
    except UserError as e:
        raise UserError(f"--init-from {opts.init_from}: its tokenizer, which tells what each embedding stands for, "
                        f"cannot be read ({e}); copy in the tokenizer it was trained with") from None
    if not same_tokens(load_tokenizer(Path(opts.data_dir) / meta["tokenizer"], meta.get("eot_id")), theirs):
        raise UserError(f"the dataset in {opts.data_dir} was encoded with another tokenizer than --init-from "
                        f"{opts.init_from}'s, so its pretrained embeddings would stand for other tokens; {remedy}")


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


def open_data(opts: TrainOptions, config: GPTConfig, meta: dict,
              world: distributed.World) -> tuple[TokenWindows, TokenWindows]:
    grad_accum = opts.grad_accum or world.size
    return tuple(TokenWindows(TokenWindows.split_files(Path(opts.data_dir), meta, split), meta["dtype"],
                              meta["vocab_size"], meta[f"{split}_tokens"], config.block_size, opts.batch_size,
                              grad_accum, world.rank, world.size, opts.seed, world.device)
                 for split in ("train", "val"))
