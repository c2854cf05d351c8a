"""data/prepare.py on a generated JSON lines corpus: encoding MB/s and peak memory with one worker and with every
core, at 100 MB and at 1 GB, and what that makes of FineWeb's sample-10BT.

    python bench/bench_prepare.py            # 100 MB and 1 GB (about 10 minutes on 2 idle cores)
    python bench/bench_prepare.py --quick    # 100 MB only

The corpus is written to --tmp-dir and deleted afterwards, datasets included: documents of 200 to 6,000 characters of
Zipf-distributed made-up words in sentences and paragraphs, generated from a fixed seed (the same bytes every run).
Each case is one `python data/prepare.py CORPUS --workers N` process with its defaults (a 4096-token bpe tokenizer
trained on a 20 MB sample, 100 M-token shards):
  total s      the whole command: reading, sampling, training the tokenizer, encoding
  encode MB/s  input bytes per second of the encoding phase (prepare.py prints it)
  speed-up     encode MB/s over the one-worker run's at the same size
  CPU s        CPU seconds of the encoding phase in the main process (reading, writing) and in the workers
  idle cores   the encoding rate and speed-up the CPU times give on idle cores: the phase lasts as long as the
               main process's CPU time, one worker's share, or all of it spread over every core, whichever is
               longest. On a machine busy with other work the wall times say little: Linux shares the CPU between
               sessions, so more workers in one session do not get more of it.
  peak RSS     the largest sum of resident memory over the process and its workers, sampled every 50 ms

Targets (on a 2-core machine): 2 workers encode at least 1.7x as fast as one; peak RSS under 1 GB at 1 GB of input,
and less than 10% above the 100 MB run's. The FineWeb sample-10BT estimate takes ~40 GB of text: its encoding from
the CPU seconds per MB of the main process and of the workers (on many cores the main process's share bounds it),
the phases before encoding (serial) from their CPU seconds, per MB and fixed. The generated corpus repeats 2,000
documents, which sentencepiece counts once, so training its tokenizer is quicker than on as much real text.
"""
import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FINEWEB_10BT_MB = 40_000  # its text, in MB
WORDS = 20_000
POLL_S = 0.05


def write_corpus(path: Path, megabytes: int, seed: int = 0) -> None:
    """JSON lines of made-up text: a pool of generated documents, each emitted many times under its own number
    (speed does not depend on repeats: the encoder has no cache)."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    frequency = 1 / np.arange(1, 27) ** 0.9
    words = ["".join(rng.choice(letters, size=rng.integers(1, 11), p=frequency / frequency.sum()))
             for _ in range(WORDS)]
    zipf = 1 / np.arange(1, WORDS + 1)
    zipf /= zipf.sum()
    pool = []
    for _ in range(2_000):
        picks = rng.choice(WORDS, size=int(rng.integers(40, 1_000)), p=zipf)
        sentences = [" ".join(words[i] for i in picks[j:j + 12]).capitalize() + rng.choice([".", ".", "?", "!"])
                     for j in range(0, len(picks), 12)]
        pool.append("\n\n".join(" ".join(sentences[k:k + 5]) for k in range(0, len(sentences), 5)))
    target, written, number = megabytes * 1_000_000, 0, 0
    with open(path, "w") as f:
        while written < target:
            line = json.dumps({"id": number, "text": f"Document {number}. {pool[rng.integers(len(pool))]}"}) + "\n"
            f.write(line)
            written += len(line)
            number += 1


def process_tree_rss(pid: int) -> int:
    """Resident bytes of a process and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += int(re.search(r"VmRSS:\s+(\d+) kB", status)[1]) * 1024 if "VmRSS" in status else 0
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(child) for child in (task / "children").read_text().split()]
        except (OSError, TypeError):
            continue  # it exited meanwhile
    return total


def run_prepare(corpus: Path, out: Path, workers: int) -> dict:
    command = [sys.executable, str(REPO / "data/prepare.py"), str(corpus), "--out-dir", str(out), "--workers",
               str(workers), "--overwrite"]
    started, cpu_before = time.perf_counter(), _children_cpu_s()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None:
        peak = max(peak, process_tree_rss(process.pid))
        time.sleep(POLL_S)
    total = time.perf_counter() - started
    stdout, stderr = process.communicate()
    total_cpu = _children_cpu_s() - cpu_before  # the process and its workers, once all have exited
    if process.returncode:
        sys.exit(f"error: {' '.join(command)} failed: {stderr.strip()}")
    encoded = re.search(r"encoded ([\d,.]+) MB in ([\d,.]+) s .* CPU ([\d,.]+) s in this process, ([\d,.]+) s in "
                        "workers", stdout)
    mb, seconds, main_cpu, workers_cpu = (float(encoded[i].replace(",", "")) for i in range(1, 5))
    # The encoding phase's wall time on idle cores: the main process, each worker, or all the CPU time spread over
    # every core, whichever is longest.
    idle_s = max(main_cpu, workers_cpu / workers, (main_cpu + workers_cpu) / (os.cpu_count() or 1))
    return dict(workers=workers, total_s=total, encode_s=seconds, encode_mb_s=mb / seconds, main_cpu_s=main_cpu,
                workers_cpu_s=workers_cpu, idle_mb_s=mb / idle_s, before_cpu_s=total_cpu - main_cpu - workers_cpu,
                peak_rss_mb=peak / 1e6)


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 100 MB corpus only")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, metavar="MB",
                        help="corpus sizes in MB (default: 100 1000; 100 with --quick)")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="worker counts to compare (default: 1 and one per core)")
    parser.add_argument("--tmp-dir", default=tempfile.gettempdir(), help="where the corpus and datasets go")
    args = parser.parse_args()
    sizes = args.sizes or ([100] if args.quick else [100, 1000])
    workers = args.workers or sorted({1, os.cpu_count() or 1})
    load = os.getloadavg()
    print(f"{platform.node()}: {os.cpu_count()} cores, {platform.python_version()}, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f} at the start")
    results = []
    work = Path(tempfile.mkdtemp(prefix="bench_prepare-", dir=args.tmp_dir))
    try:
        for size in sizes:
            corpus = work / f"corpus-{size}mb.jsonl"
            write_corpus(corpus, size)
            for n in workers:
                result = dict(size_mb=size, **run_prepare(corpus, work / "dataset", n))
                results.append(result)
                print(json.dumps(result), flush=True)
                shutil.rmtree(work / "dataset")
            corpus.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print_table(results, workers)


def print_table(results: list[dict], workers: list[int]) -> None:
    print("\n| input | workers | total s | encode MB/s | speed-up | CPU s: main, workers | idle cores: MB/s, speed-up "
          "| peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    one = {r["size_mb"]: r for r in results if r["workers"] == 1}
    for r in results:
        speedup, idle_speedup = ((f"{r[key] / one[r['size_mb']][key]:.2f}x" if r["size_mb"] in one else "-")
                                 for key in ("encode_mb_s", "idle_mb_s"))
        print(f"| {r['size_mb']:,} MB | {r['workers']} | {r['total_s']:.0f} | {r['encode_mb_s']:.2f} | {speedup} | "
              f"{r['main_cpu_s']:.1f}, {r['workers_cpu_s']:.1f} | {r['idle_mb_s']:.2f}, {idle_speedup} | "
              f"{r['peak_rss_mb']:.0f} |")
    largest = max(r["size_mb"] for r in results)
    at_largest = {r["workers"]: r for r in results if r["size_mb"] == largest}
    if 1 not in at_largest or len(at_largest) < 2:
        return
    most = max(at_largest)
    # FineWeb sample-10BT, from CPU times, which other load on the machine does not inflate as it does wall times:
    # the encoding phase's per MB in the run with the most workers (the main process's, and the workers' shared among
    # the cores); the phases before it (reading and hashing, drawing the sample, training the tokenizer), serial,
    # split into a part that grows with the input and a fixed one where two sizes were measured.
    r = at_largest[most]
    main_s, workers_s = r["main_cpu_s"] / largest, r["workers_cpu_s"] / largest
    before = {r["size_mb"]: r["before_cpu_s"] for r in results if r["workers"] == most}
    small, large = min(before), max(before)
    per_mb = (before[large] - before[small]) / (large - small) if large > small else before[large] / large
    fixed_s = max(0.0, before[large] - per_mb * large)
    estimates = []
    for cores in (2, 16, 64):
        encode_s = FINEWEB_10BT_MB * max(main_s, workers_s / cores, (main_s + workers_s) / cores)
        estimates.append(f"{cores} cores {(fixed_s + FINEWEB_10BT_MB * per_mb + encode_s) / 60:.0f} min "
                         f"(encoding {encode_s / 60:.0f})")
    print(f"\nFineWeb sample-10BT (~{FINEWEB_10BT_MB // 1000} GB of text) on idle cores: {', '.join(estimates)}; "
          f"before encoding {per_mb * 1000:.1f} s per GB + {fixed_s:.0f} s")

if __name__ == "__main__":
    main()
