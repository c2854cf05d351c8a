"""What checkpoints cost a run, and how long a restart takes to train again.

    python -m bench.checkpoint_overhead              # CPU: the default run's model, a checkpoint every 10 steps
    python -m bench.checkpoint_overhead --device cuda --model small

1. Step time with checkpoints written synchronously (every rank waits for the write) against asynchronously (the
   state is copied to host memory and written by a background thread), one run of each after the other, --repeats
   times alternately; the time per step is measured between the first and last logged step of each run (every step
   logged), so it includes the checkpoints' share.
2. Restart: two ranks under torchrun --max-restarts 1, rank 1 killed (SIGKILL) after step --kill-at; the seconds from
   torchrun's report of the dead worker to the first step trained after the restart (the restarted processes'
   start-up, the process group, the resume from the last checkpoint).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="mini", help="train.py's --model preset")
    p.add_argument("--steps", type=int, default=60, help="steps in each timed run")
    p.add_argument("--ckpt-interval", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="runs of each kind, alternately")
    p.add_argument("--kill-at", type=int, default=15, help="step after which the restart measurement's rank 1 dies")
    p.add_argument("--out", type=Path, help="write the results as JSON here too")
    return p.parse_args(argv)


def train_args(args, out_dir: Path, steps: int) -> list[str]:
    return ["--device", args.device, "--model", args.model, "--out-dir", str(out_dir), "--max-iters", str(steps),
            "--ckpt-interval", str(args.ckpt_interval), "--eval-interval", str(10 * steps), "--log-interval", "1",
            "--sample-tokens", "0"]


def seconds_per_step(args, asynchronous: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        flag = "--async-checkpoint" if asynchronous else "--no-async-checkpoint"
        subprocess.run([sys.executable, "train.py", *train_args(args, Path(tmp), args.steps), flag], cwd=REPO,
                       check=True, capture_output=True)
        lines = [json.loads(line) for line in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
        times = {m["step"]: m["time"] for m in lines if "train/loss" in m}
        first, last = min(times), max(times)  # the last step's own checkpoint comes after its log line
        return (times[last] - times[first]) / (last - first)


def restart_seconds(args) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "TRITONGPT_FAULT_DRILL": str(args.kill_at), "OMP_NUM_THREADS": "1",
               "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "--max-restarts", "1", "train.py", *train_args(args, Path(tmp), 2 * args.kill_at)],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        died = resumed = None
        for line in proc.stdout:
            if died is None and "exitcode: -9" in line:
                died = time.monotonic()
            elif died is not None and resumed is None and line.startswith("resuming from step"):
                resumed = line
            elif resumed is not None and line.startswith("step ") and "/" in line.split()[1]:
                first_step = time.monotonic()
                proc.kill()
                break
        proc.wait()
        if resumed is None:
            raise SystemExit("the run never restarted: see `torchrun ... train.py` with TRITONGPT_FAULT_DRILL set")
        return first_step - died


def main(argv=None) -> None:
    args = parse_args(argv)
    runs = {"sync": [], "async": []}
    for _ in range(args.repeats):
        runs["sync"].append(seconds_per_step(args, asynchronous=False))
        runs["async"].append(seconds_per_step(args, asynchronous=True))
    sync, asynchronous = statistics.median(runs["sync"]), statistics.median(runs["async"])
    print(f"{args.model} on {args.device}, a checkpoint every {args.ckpt_interval} steps, median of {args.repeats}:")
    print(f"  synchronous   {sync * 1e3:8.1f} ms/step  (runs: {', '.join(f'{t * 1e3:.1f}' for t in runs['sync'])})")
    print(f"  asynchronous  {asynchronous * 1e3:8.1f} ms/step  (runs: "
          f"{', '.join(f'{t * 1e3:.1f}' for t in runs['async'])})")
    print(f"  async / sync  {asynchronous / sync:.3f}")
    restart = restart_seconds(args)
    print(f"restart: {restart:.1f} s from the dead worker's report to the first step trained again (2 ranks)")
    if args.out:
        args.out.write_text(json.dumps({"device": args.device, "model": args.model, "ckpt_interval": args.ckpt_interval,
                                        "seconds_per_step": runs, "restart_seconds": restart}, indent=2) + "\n")


if __name__ == "__main__":
    main()
