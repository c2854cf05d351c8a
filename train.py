"""Train a GPT on a tokenized dataset, on one device or many under torchrun.

    python train.py                                         # the default corpus, a small model, then a sample
    torchrun --standalone --nproc_per_node=8 train.py --model gpt2 --data-dir data/mycorpus
"""
import dataclasses
import io
import json
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from tritongpt import distributed
from tritongpt.checkpoint import (CheckpointWriter, interrupts_deferred, nonfinite_weights, pack_tokenizer,
                                  restore)
from tritongpt.data.loader import TokenWindows
from tritongpt.data.prepare import prepare
from tritongpt.data.tokenizer import HuggingFaceTokenizer, Tokenizer, load_tokenizer
from tritongpt.device import autocast, compute_dtype, out_of_memory
from tritongpt.errors import UserError
from tritongpt.files import DirectoryLock
from tritongpt.loop import estimate_loss, train_step
from tritongpt.metrics import MetricsLogger, mfu
from tritongpt.model import GPT, GPTConfig, load_gpt2
from tritongpt.optim import configure_optimizers, hidden_matrices, scale_learning_rates
from tritongpt.options import parse_options, run_main
from tritongpt.plot import CURVES_FILE
from tritongpt.schedule import learning_rate
from tritongpt.stopping import SIGNAL_NAMES, StopRequests
from tritongpt.textgen import prompt_ids, stream_text
from tritongpt.train_options import RUN_FILES, TrainOptions, check_dataset, check_run, warmup_iters


def main(argv: list[str] | None = None) -> None:
    opts, given = parse_options(TrainOptions, __doc__.splitlines()[0], argv)
    world = distributed.world_from_env(opts.device)
    with DirectoryLock(opts.out_dir) as out_dir_lock:  # rank 0 holds OUT_DIR from its checks to the end
        opts, config, resume_from, ckpt = check_run(opts, given, world, out_dir_lock)  # every rank refuses a
        if ckpt is not None and ckpt["iter_num"] >= opts.max_iters:  # mistake alike, before talking
            print(f"the run in {opts.out_dir} already reached step {ckpt['iter_num']}: nothing left to train")
            return  # (a torchrun restart after the last checkpoint)
        world = replace(world, parallel=opts.parallel)
        distributed.join(world)
        try:
            train(opts, config, resume_from, ckpt, world)
            distributed.barrier(world)  # a rank that tore the group down while another still talked would abort it
        except RuntimeError as e:  # torch.OutOfMemoryError is one
            if (size := out_of_memory(e)) is None:
                raise
            raise UserError(f"out of memory on {world.device}{f' (allocating {size} failed)' if size else ''}: "
                            "this run's shapes do not fit; lower --batch-size (a larger --grad-accum keeps the "
                            "global batch), --block-size or the model's size") from None
        finally:
            distributed.leave(world)


# ---------------------------------------------------------------------------------------------------------------
# Set-up: options -> data, model, optimizer, logger.

@dataclass
class Run:
    """What the training loop works with."""
    opts: TrainOptions
    world: distributed.World
    config: GPTConfig
    model: GPT                       # the model itself (sharded in place under FSDP): its state, generation, MFU
    eval_model: torch.nn.Module      # the model as evaluation calls it (compiled when --compile)
    net: torch.nn.Module             # the model as the training step calls it (also DDP-wrapped under torchrun)
    optimizers: list[torch.optim.Optimizer]  # stepped in turn: AdamW alone, or Muon then AdamW
    checkpoints: CheckpointWriter
    scaler: torch.amp.GradScaler
    dtype: torch.dtype               # what autocast computes in
    autocast: torch.autocast
    train_data: TokenWindows
    val_data: TokenWindows
    tokenizer: Tokenizer | HuggingFaceTokenizer
    logger: MetricsLogger
    step: int                        # optimizer steps taken
    stopped_by: int | None           # the signal that stopped the run (on any rank), if one did
    first_nonfinite_step: torch.Tensor  # on the device: the first step whose loss or gradient was inf/nan, else a
                                        # step past the end (tracked without waiting for the device)
    eval_losses: dict[str, float] = field(default_factory=dict)  # the last evaluation's, by split


    def say(self, text: str) -> None:
        if self.world.is_main:
            tqdm.write(text)  # above the progress bar, never through it


def set_up(opts: TrainOptions, config: GPTConfig, resume_from: Path | None, ckpt: dict | None,
           world: distributed.World) -> Run:
    meta = ensure_dataset(opts, world)
    if ckpt is None and not opts.init_from:
        config = replace(config, vocab_size=meta["vocab_size"])
    train_data, val_data = check_dataset(opts, config, meta, ckpt, world)
    tokenizer = load_tokenizer(Path(opts.data_dir) / meta["tokenizer"], meta.get("eot_id"))
    if opts.init_from and ckpt is None:
        model = load_gpt2(opts.init_from, config)
    else:
        torch.manual_seed(opts.seed)
        model = GPT(config)
    model.to(world.device)
    dtype = compute_dtype(opts.dtype, world.device)
    scaler = torch.amp.GradScaler(world.device.type, enabled=dtype == torch.float16)
    eval_model, net = distributed.wrap_model(model, world, opts.compile, opts.replicate,
                                             opts.fsdp_reshard_after_forward, dtype)
    optimizers = configure_optimizers(model, opts, world.device.type)
    torch.manual_seed(opts.seed + world.rank)  # dropout differs per rank; the data order does not depend on it
    step = 0
    if ckpt is not None:
        restore(resume_from, model, optimizers)  # each rank its shards under FSDP
        scaler.load_state_dict(ckpt["scaler"])
        train_data.load_state_dict(ckpt["data"])
        step = ckpt["iter_num"]
        restore_rng(ckpt["rng"], world)
    if ckpt is None and world.is_main:  # a new run: an earlier one's files were to go (--overwrite, or no checkpoint)
        for name in RUN_FILES:
            path = Path(opts.out_dir) / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    checkpoints = CheckpointWriter(opts.out_dir, world, opts.keep_checkpoints, opts.async_checkpoint,
                                   last=(step, resume_from) if ckpt else None)
    job, restarts = distributed.launch()
    logger = MetricsLogger(
        opts.out_dir, config={"options": dataclasses.asdict(opts), "model": dataclasses.asdict(config),
                              "num_params": model.num_params(), "world_size": world.size,
                              "tokens_per_step": tokens_per_step(opts, config, world),
                              "launch": {"job": job, "restart": restarts}},
        wandb=opts.wandb, project=opts.wandb_project, run_name=opts.wandb_run_name, entity=opts.wandb_entity,
        mode=opts.wandb_mode, resume_run_id=ckpt.get("wandb_run_id") if ckpt else None,
        resume_step=step + 1 if ckpt else None,  # the checkpoint's own step was logged before it was written
        enabled=world.is_main)
    return Run(opts, world, config, model, eval_model, net, optimizers, checkpoints, scaler, dtype,
               autocast(dtype, world.device), train_data, val_data, tokenizer, logger, step, None,
               torch.tensor(opts.max_iters + 1, device=world.device))


def ensure_dataset(opts: TrainOptions, world: distributed.World) -> dict:
    """The dataset's meta.json, preparing the default corpus on first use (on rank 0, the others waiting)."""
    data_dir = Path(opts.data_dir)
    if not (data_dir / "meta.json").is_file():
        if world.is_main:
            print(f"preparing the default corpus into {data_dir} (once)")
            prepare(out_dir=data_dir)
        distributed.barrier(world)
    return json.loads((data_dir / "meta.json").read_text())


def tokens_per_step(opts: TrainOptions, config: GPTConfig, world: distributed.World) -> int:
    return opts.batch_size * (opts.grad_accum or world.size) * config.block_size


def plural(n: int, word: str, words: str) -> str:
    return f"{n} {word if n == 1 else words}"


def describe(run: Run) -> None:
    c, opts, world = run.config, run.opts, run.world
    grad_accum = opts.grad_accum or world.size
    run.say(f"model: {run.model.num_params() / 1e6:.2f}M parameters, {c.n_layer} layers, {c.n_head} heads, "
            f"width {c.n_embd}, context {c.block_size}; ops: attention={c.attention}, layernorm={c.layernorm}, "
            f"mlp={c.mlp}, loss={c.loss}{' under torch.compile' if opts.compile else ''}; {world.device}, "
            f"{str(run.dtype).removeprefix('torch.')}")
    run.say(f"global batch: {plural(opts.batch_size, 'sequence', 'sequences')} x "
            f"{plural(grad_accum, 'micro-batch', 'micro-batches')} x {c.block_size} tokens = "
            f"{tokens_per_step(opts, c, world):,} tokens per step ({plural(world.size, 'process', 'processes')} x "
            f"{plural(grad_accum // world.size, 'micro-batch', 'micro-batches')} each)")
    if opts.optimizer == "muon":
        run.say(f"optimizer: Muon on the blocks' {len(hidden_matrices(run.model))} matrices (peak lr "
                f"{opts.muon_lr:g}), AdamW on the rest (peak lr {opts.learning_rate:.2e})")
    else:
        run.say(f"optimizer: AdamW (peak lr {opts.learning_rate:.2e})")
    if run.step:
        run.say(f"resuming from step {run.step} of {opts.max_iters} ({run.checkpoints.last_path})")


# ---------------------------------------------------------------------------------------------------------------
# The loop.

def train(opts: TrainOptions, config: GPTConfig, resume_from: Path | None, ckpt: dict | None,
          world: distributed.World) -> None:
    run = set_up(opts, config, resume_from, ckpt, world)
    describe(run)
    # Up to the exit: once the run stops, a signal that follows (torchrun's, as it ends the job) is only noted.
    with StopRequests() as stop_requests:
        try:
            loop(run, stop_requests)
            run.checkpoints.finish()
        except (UserError, KeyboardInterrupt) as e:
            run.checkpoints.finish()  # the write under way holds a healthy step: it completes before the report
            if isinstance(e, KeyboardInterrupt):
                run.say(f"stopped at step {run.step}; {run.checkpoints.describe_last()}")
            raise
        except BaseException as e:  # torch.distributed.checkpoint's errors are BaseExceptions
            if (gone := distributed.lost_ranks(e, world)) is None:
                raise
            report_lost_ranks(run, gone)
        finally:
            run.logger.finish()
        if run.stopped_by:
            if world.is_main:
                print(f"stopped by {SIGNAL_NAMES[run.stopped_by]} after step {run.step}; {run.checkpoints.describe_last()}",
                      file=sys.stderr)
            distributed.barrier(world)  # torchrun ends the job when a rank exits: none leaves before rank 0 is done
            sys.exit(128 + run.stopped_by)  # what the signal's default action would have reported
    if run.eval_losses:
        curves = Path(opts.out_dir) / CURVES_FILE
        run.say(f"final val loss {run.eval_losses['val']:.3f} (train {run.eval_losses['train']:.3f})"
                + (f"; the curves are in {curves}" if curves.exists() else ""))  # not drawn without matplotlib
    if opts.sample_tokens > 0 and (world.is_main or world.sharded):
        closing_sample(run)


def loop(run: Run, stop_requests: StopRequests) -> None:
    opts = run.opts
    if run.step == 0:
        evaluate(run)
    bar = tqdm(total=opts.max_iters, initial=run.step, disable=not run.world.is_main or None, unit="step",
               dynamic_ncols=True)
    micro_steps = (opts.grad_accum or run.world.size) // run.world.size
    clock = (time.perf_counter(), run.step)  # (time, step) at the last log line
    while run.step < opts.max_iters:
        # Every group's rate is its own peak rate (Muon's and AdamW's differ) times the schedule's factor.
        lr_factor = learning_rate(run.step, 1.0, (opts.min_lr or opts.learning_rate / 10) / opts.learning_rate,
                                  warmup_iters(opts), opts.lr_decay_iters or opts.max_iters)
        scale_learning_rates(run.optimizers, lr_factor, opts)
        micro_batches = (run.train_data.fetch(starts) for starts in run.train_data.next_step())
        loss, grad_norm = train_step(run.model, run.net, run.optimizers, run.scaler, micro_batches, micro_steps,
                                     run.autocast, opts.grad_clip)
        run.step += 1
        fault_drill(run)
        note_nonfinite(run, loss, grad_norm)
        run.checkpoints.poll()
        bar.update()
        last = run.step == opts.max_iters
        if run.step % opts.log_interval == 0 or last:
            clock = log_progress(run, loss, grad_norm, lr_factor, clock)
        evaluating = run.step % opts.eval_interval == 0 or last
        if evaluating:
            evaluate(run)
        saving = run.step % (opts.ckpt_interval or opts.eval_interval) == 0 or last
        if saving:
            save(run)
        run.stopped_by = distributed.max_on_host(stop_requests.received or 0, run.world) or None  # every rank alike
        if run.stopped_by:
            if not saving:
                save(run)
            break
        if evaluating or saving:
            clock = (time.perf_counter(), run.step)  # tokens/s counts training steps only
    bar.close()


def report_lost_ranks(run: Run, gone: list[int]) -> None:
    """Ends this rank after others were lost: the lowest rank still running says so in one line (every rank does,
    when which ones are gone is unknown), with what comes next: torchrun's restart, or else the user's --resume."""
    restarting = distributed.launch()[1] < int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))
    next_step = ("torchrun restarts the job, which continues from its last checkpoint" if restarting
                 else run.checkpoints.describe_last())
    error = "" if restarting else "error: "
    if gone:
        if run.world.rank == min(set(range(run.world.size)) - set(gone)):
            print(f"{error}rank{'s' * (len(gone) > 1)} {', '.join(map(str, gone))} of the job "
                  f"{'are' if len(gone) > 1 else 'is'} gone (killed, or ended by an error of its own) after step "
                  f"{run.step}; {next_step}", file=sys.stderr)
    else:
        print(f"{error}rank {run.world.rank} lost the connection to the other ranks after step {run.step}; {next_step}",
              file=sys.stderr)
    sys.exit(1)


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
                        f"{run.checkpoints.describe_last()} (try a lower --learning-rate)")


FAULT_DRILL = "TRITONGPT_FAULT_DRILL"


def fault_drill(run: Run) -> None:
    """Rehearses a lost worker: with TRITONGPT_FAULT_DRILL=STEP set, the last rank kills itself (SIGKILL) after
    that step, in the job's first launch only, so that a torchrun restart then resumes the run."""
    drill = os.environ.get(FAULT_DRILL)
    if drill and run.step == int(drill) and run.world.rank == run.world.size - 1 and distributed.launch()[1] == 0:
        os.kill(os.getpid(), signal.SIGKILL)


def log_progress(run: Run, loss: torch.Tensor, grad_norm: torch.Tensor, lr_factor: float,
                 clock: tuple[float, int]) -> tuple[float, int]:
    stop_if_diverged(run)
    now = time.perf_counter()
    step_time = (now - clock[0]) / (run.step - clock[1])
    train_loss = distributed.sum_across_ranks(loss, run.world).item() / run.world.size
    tokens_per_sec = tokens_per_step(run.opts, run.config, run.world) / step_time
    utilisation = mfu(run.model.flops_per_token(), tokens_per_sec / run.world.size, run.world.device)
    lr = lr_factor * run.opts.learning_rate  # AdamW's, as with AdamW alone
    metrics = {"train/loss": train_loss, "lr": lr, "grad_norm": grad_norm.item(), "tokens_per_sec": tokens_per_sec,
               "mfu": utilisation, "step_time_ms": step_time * 1e3}
    if run.opts.optimizer == "muon":
        metrics["muon_lr"] = lr_factor * run.opts.muon_lr
    if run.world.device.type == "cuda":
        metrics["gpu_peak_mem_gib"] = torch.cuda.max_memory_allocated(run.world.device) / 2**30
    run.logger.log(run.step, metrics)
    mfu_text = "" if utilisation is None else f" | mfu {utilisation:.1%}"  # unknown on a CPU: left out
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
    run.eval_losses = losses
    run.logger.log(run.step, {"val/loss": losses["val"], "train/eval_loss": losses["train"]})


def save(run: Run) -> None:
    """Hands the step's checkpoint to the writer, after making sure that nothing non-finite replaces a good one."""
    stop_if_diverged(run)
    broken = nonfinite_weights(run.model.state_dict())
    if distributed.max_on_host(len(broken), run.world):  # a shard of any rank's
        raise UserError(f"training diverged: the weights at step {run.step} hold inf or nan; {run.checkpoints.describe_last()} "
                        "(try a lower --learning-rate)")
    rng = distributed.gather_objects(rng_state(run.world.device), run.world)
    with interrupts_deferred():  # Ctrl-C meanwhile would leave a checkpoint on disk that the run does not know of
        run.checkpoints.save(run.step, run.model, run.optimizers, {
            "scaler": run.scaler.state_dict(), "model_config": dataclasses.asdict(run.config),
            "options": dataclasses.asdict(run.opts), "tokenizer": pack_tokenizer(run.tokenizer),
            "iter_num": run.step, "data": run.train_data.state_dict(), "rng": rng, "world_size": run.world.size,
            "wandb_run_id": run.logger.run_id,
        })


def closing_sample(run: Run) -> None:
    """Rank 0 shows a sample. Under FSDP every rank generates it, since each layer's forward gathers its weights
    from every rank: the ranks compute the same logits from the same weights, so with the same seed they draw
    the same tokens and stop together."""
    if run.world.is_main:
        print(f"checkpoint: {run.checkpoints.last_path}\n--- sample ---")
        print(run.opts.sample_prompt, end="", flush=True)
    run.model.eval()
    prompt = prompt_ids(run.tokenizer, run.opts.sample_prompt, run.config.block_size)
    with run.autocast, distributed.whole_weights(run.model):
        stream_text(run.model, run.tokenizer, prompt, run.opts.sample_tokens, run.world.device,
                    out=None if run.world.is_main else io.StringIO(), temperature=0.8, top_k=200,
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
