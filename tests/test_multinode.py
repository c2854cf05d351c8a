"""Two torchrun launches on this machine standing for two nodes (the README's multi-node command: a c10d rendezvous,
here on 127.0.0.1, one gloo process each): they train exactly what one launch of two processes trains, and a rank
killed on one node ends the other node's rank too, which torchrun does not stop there."""
import os
import signal
import socket

import pytest
import torch

from tritongpt.checkpoint import load_checkpoint
from tests.runs import (LOST_RANK_EXIT_S, REPO, SCHEDULE, TINY, alive, assert_lost_rank_reported, checkpointed,
                        exit_codes, finished, metrics, torchrun, workers_of)

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous(endpoint: str) -> tuple[str, ...]:
    return "--nnodes=2", "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=JOB_ID"


def two_nodes(*args: str) -> list:
    """Two torchrun launches of one process each, meeting at a c10d rendezvous on this machine."""
    endpoint = f"127.0.0.1:{free_port()}"
    return [torchrun(*args, nproc=1, rendezvous=rendezvous(endpoint)) for _ in range(2)]


def test_the_readme_shows_the_command_tested():
    assert f"torchrun {' '.join(rendezvous('HOST0:29500'))} --nproc_per_node=8" in (REPO / "README.md").read_text()


def test_two_nodes_train_what_one_node_trains(tiny_dataset, two_rank_run, tmp_path):
    out = tmp_path / "nodes"  # one directory for both "nodes", as on a cluster's shared file system
    nodes = two_nodes("--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, *SCHEDULE, "--max-iters", "6")
    outputs = [finished(node) for node in nodes]
    # Global rank 0 (on whichever node the rendezvous made the first) alone reports and writes the run's files.
    assert sorted("final val loss" in output for output in outputs) == [False, True]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in two_rank_run.iterdir())
    # The same two ranks, each on the same windows with the same seed, whatever node they run on; the all-reduce
    # of two ranks adds one pair of numbers per element, and a + b == b + a exactly: bitwise the same run.
    assert losses(out) == losses(two_rank_run)
    a, b = (load_checkpoint(run)["model"] for run in (out, two_rank_run))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_rank_killed_on_one_node_ends_the_other_node_in_one_line(tiny_dataset, tmp_path):
    out = tmp_path / "killed"
    nodes = two_nodes("--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, "--max-iters", "100000",
                      "--eval-interval", "100000", "--ckpt-interval", "3")
    workers = {}
    try:
        checkpointed(nodes, out)
        workers = {rank: (node, pid) for node in nodes for rank, pid in workers_of(node.pid).items()}
        assert sorted(workers) == [0, 1]
        os.kill(workers[1][1], signal.SIGKILL)
        killed, survivor = workers[1][0], workers[0][0]
        # The killed rank's torchrun ends its job. The other's sees its own worker healthy: that worker must end
        # by itself, on meeting the lost rank in its next collective.
        output = survivor.communicate(timeout=LOST_RANK_EXIT_S)[0]
        assert survivor.returncode == 1
        assert_lost_rank_reported(output, out, rank=1)
        # That torchrun reports rank 0's exit status 1, unless it failed first on losing the rendezvous, which the
        # killed rank's torchrun held (it bound the endpoint first) and took along when it ended.
        assert exit_codes(output) == {"0": "1"} or "RendezvousConnectionError" in output, output[-3000:]
        killed_output = killed.communicate(timeout=LOST_RANK_EXIT_S)[0]
        assert killed.returncode == 1 and exit_codes(killed_output) == {"1": "-9"}, killed_output[-3000:]
        assert not any(alive(pid) for _, pid in workers.values())
    finally:
        for pid in [*(pid for _, pid in workers.values()), *(node.pid for node in nodes)]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        for node in nodes:
            node.communicate(timeout=60)


def losses(out_dir) -> list[dict]:
    """What metrics.jsonl holds of the computation, in order (not its timings)."""
    return [{key: m[key] for key in ("step", "train/loss", "grad_norm", "val/loss") if key in m}
            for m in metrics(out_dir)]
