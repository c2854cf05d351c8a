"""Two torchrun launches on this machine standing for two nodes (the README's multi-node command: a c10d rendezvous,
here on 127.0.0.1, one gloo process each) train exactly what one launch of two processes trains."""
import socket

import pytest
import torch

from tritongpt.checkpoint import load_checkpoint
from tests.runs import SCHEDULE, TINY, finished, metrics, torchrun

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_train_what_one_node_trains(tiny_dataset, two_rank_run, tmp_path):
    out = tmp_path / "nodes"  # one directory for both "nodes", as on a cluster's shared file system
    rendezvous = ("--nnodes=2", "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{free_port()}",
                  "--rdzv_id=test-two-nodes")
    nodes = [torchrun("--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, *SCHEDULE, "--max-iters", "6",
                      nproc=1, rendezvous=rendezvous) for _ in range(2)]
    outputs = [finished(node) for node in nodes]
    # Global rank 0 (on whichever node the rendezvous made the first) alone reports and writes the run's files.
    assert sorted("final val loss" in output for output in outputs) == [False, True]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in two_rank_run.iterdir())
    # The same two ranks, each on the same windows with the same seed, whatever node they run on; the all-reduce
    # of two ranks adds one pair of numbers per element, and a + b == b + a exactly: bitwise the same run.
    assert losses(out) == losses(two_rank_run)
    a, b = (load_checkpoint(run)["model"] for run in (out, two_rank_run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def losses(out_dir) -> list[dict]:
    """What metrics.jsonl holds of the computation, in order (not its timings)."""
    return [{key: m[key] for key in ("step", "train/loss", "grad_norm", "val/loss") if key in m}
            for m in metrics(out_dir)]
