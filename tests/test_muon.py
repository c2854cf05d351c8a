"""--optimizer muon: Muon on the blocks' matrices, AdamW on the rest, through train.py's whole step."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tritongpt import distributed, plot
from tritongpt.checkpoint import SINGLE_FILE, load_checkpoint, save_checkpoint
from tritongpt.loop import train_step
from tritongpt.metrics import MetricsLogger
from tritongpt.model import GPT, GPTConfig
from tritongpt.optim import configure_optimizers
from tritongpt.train_options import TrainOptions, default_learning_rate, warmup_iters
from tests.runs import (TINY, assert_resumed_run_matches_uninterrupted, assert_user_error, finished, metrics,
                        run, torchrun)
from tests.test_ddp import metrics_by_step
from tests.test_fsdp import SIX_STEPS

CONFIG = GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
MUON = TrainOptions(optimizer="muon", learning_rate=1e-2, muon_lr=0.05)
NO_SCALING = torch.amp.GradScaler("cpu", enabled=False)


def tiny_model() -> GPT:
    torch.manual_seed(0)
    return GPT(CONFIG)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny_model()
    names = {p: name for name, p in model.named_parameters()}
    muon, adamw = configure_optimizers(model, MUON, "cpu")
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    assert sorted(names[p] for g in muon.param_groups for p in g["params"]) == sorted(
        f"transformer.h.{i}.{matrix}.weight" for i in range(2)
        for matrix in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    decayed, plain = adamw.param_groups
    # The token embedding is the tied LM head: one parameter, under its first name.
    assert sorted(names[p] for p in decayed["params"]) == ["transformer.wpe.weight", "transformer.wte.weight"]
    assert sorted(names[p] for p in plain["params"]) == sorted(
        [f"transformer.h.{i}.{module}.{kind}" for i in range(2) for module in ("ln_1", "ln_2") for kind in
         ("weight", "bias")]
        + [f"transformer.h.{i}.{matrix}.bias" for i in range(2)
           for matrix in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
        + ["transformer.ln_f.weight", "transformer.ln_f.bias"])
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert [g["lr"] for g in muon.param_groups + adamw.param_groups] == [0.05, 1e-2, 1e-2]

    [alone] = configure_optimizers(model, TrainOptions(optimizer="adamw", learning_rate=1e-2), "cpu")
    assert isinstance(alone, torch.optim.AdamW)
    assert sum(len(g["params"]) for g in alone.param_groups) == len(names)


def test_one_muon_step_orthogonalises_the_update():
    model = tiny_model()
    weight = model.transformer.h[0].mlp.c_fc.weight  # 128 x 32
    # A gradient whose singular values span two decades: AdamW or SGD would step mostly along the largest.
    u, _ = torch.linalg.qr(torch.randn(128, 32, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(32, 32, dtype=torch.float64))
    spread = torch.logspace(0, -2, 32, dtype=torch.float64)
    weight.grad = (u @ torch.diag(spread) @ v.T).float()
    before = weight.detach().clone()
    muon, _ = configure_optimizers(model, MUON, "cpu")
    muon.step()
    # No weight decay by default; "original" scales a 128 x 32 matrix's rate by sqrt(128 / 32).
    update = (before - weight.detach()) / (0.05 * 2.0)
    singular_values = torch.linalg.svdvals(update.double())
    # Newton-Schulz (in bf16, five quintic steps tuned for speed over exactness) pushes every singular value
    # towards 1, not all the way: within about 0.7 to 1.2 of it.
    assert singular_values.min() > 0.5 and singular_values.max() < 1.5, singular_values
    assert singular_values.max() / singular_values.min() < 2.5  # from 100
    # Along the gradient's own directions: the update is U S' V^T with the gradient's U and V.
    assert torch.allclose(u.T @ update.double() @ v, torch.diag(torch.diagonal(u.T @ update.double() @ v)),
                          atol=0.05)


def test_the_schedule_scales_each_group_from_its_own_peak(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    # Past --lr-decay-iters the schedule sits at its floor, a tenth of the peak, for every group.
    result = run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, "--optimizer", "muon",
                 "--learning-rate", "4e-3", "--muon-lr", "0.03", "--max-iters", "3", "--warmup-iters", "1",
                 "--lr-decay-iters", "2", "--eval-interval", "3")
    assert result.returncode == 0, result.stderr
    optimizers = load_checkpoint(out)["optimizer"]  # both optimizers' state, keyed by parameter name
    muon, *adamw = optimizers["param_groups"]
    assert all(name.startswith("transformer.h.") for name in muon["params"])
    assert muon["lr"] == pytest.approx(0.003)
    assert [g["lr"] for g in adamw] == pytest.approx([4e-4, 4e-4])
    assert {name for name, state in optimizers["state"].items() if "momentum_buffer" in state} == set(muon["params"])


def test_resumed_muon_run_matches_uninterrupted(tiny_dataset, tmp_path):
    # Both optimizers' state is restored.
    parts, _ = assert_resumed_run_matches_uninterrupted(
        ["--data-dir", str(tiny_dataset), *TINY, "--optimizer", "muon", "--grad-accum", "2", "--eval-interval", "3",
         "--lr-decay-iters", "6", "--warmup-iters", "2"], tmp_path)
    refused = run("train.py", "--resume", "--out-dir", str(parts), "--max-iters", "8", "--optimizer", "adamw")
    assert_user_error(refused, "--optimizer cannot change a resumed run")


def test_muon_is_the_default_without_warm_up_and_with_twice_adamws_rate_on_the_rest():
    config = GPTConfig(n_layer=1, n_head=4, n_embd=128)
    assert TrainOptions().optimizer == "muon"
    assert warmup_iters(TrainOptions(max_iters=1200)) == 0
    assert warmup_iters(TrainOptions(optimizer="adamw", max_iters=1200)) == 120
    assert default_learning_rate(config, "adamw", fine_tuning=False) == pytest.approx(6e-3)
    assert default_learning_rate(config, "muon", fine_tuning=False) == pytest.approx(1.2e-2)
    assert default_learning_rate(config, "muon", fine_tuning=True) == pytest.approx(1.2e-2 / 20)


def test_a_run_from_before_the_optimizer_option_resumes_with_adamw(tiny_dataset, tmp_path):
    """Earlier versions trained with AdamW alone and wrote OUT_DIR/ckpt.pt, whose options name no optimizer: the
    run goes on with AdamW (its checkpoint holds AdamW's state), not with today's default."""
    new = tmp_path / "new"
    assert run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(new), *TINY, "--max-iters", "2",
               "--optimizer", "adamw").returncode == 0
    state = load_checkpoint(new)
    state["options"] = {k: v for k, v in state["options"].items() if k != "optimizer" and not k.startswith("muon")}
    old = tmp_path / "old"
    old.mkdir()
    save_checkpoint(old / SINGLE_FILE, state)
    resumed = run("train.py", "--resume", "--out-dir", str(old), "--max-iters", "3")
    assert resumed.returncode == 0, resumed.stderr
    assert "optimizer: AdamW" in resumed.stdout
    assert not any(k.startswith("muon") for m in metrics(old) for k in m)


@pytest.mark.slow
def test_under_fsdp_muon_orthogonalises_whole_matrices_as_one_process_does(tiny_dataset, tmp_path):
    args = ["--data-dir", str(tiny_dataset), *SIX_STEPS, "--optimizer", "muon"]
    assert run("train.py", *args, "--out-dir", str(tmp_path / "one")).returncode == 0
    finished(torchrun(*args, "--out-dir", str(tmp_path / "fsdp"), "--parallel", "fsdp"))
    one, ranks = metrics_by_step(tmp_path / "one"), metrics_by_step(tmp_path / "fsdp")
    # Each rank holds half of each matrix's rows as a DTensor, whose products in the Newton-Schulz iteration are
    # the whole matrix's. The iteration runs in bf16, so the fp32 roundings by which the ranks' sums differ from one
    # process's can flip the last bit of some of the update's elements (2^-8 of one), moving a weight by up to
    # lr x 2^-8 ~ 5e-5 a step (lr <= 1.2e-2). The losses then stay within 3e-4 relative over six steps, ten times
    # what a DDP run shows against one process (3e-5); orthogonalising each rank's rows alone would be another
    # update altogether, which changes the loss by 1.6e-3 at step 2 and by 2% at step 6.
    for step in range(1, 7):
        assert ranks[step]["train/loss"] == pytest.approx(one[step]["train/loss"], rel=3e-4), step
    assert [ranks[step]["val/loss"] for step in (3, 6)] == pytest.approx([one[step]["val/loss"] for step in (3, 6)],
                                                                      rel=3e-4)
    # The momentum buffers were saved whole, from both ranks' halves.
    saved = load_checkpoint(tmp_path / "fsdp")
    buffers = {name: state["momentum_buffer"] for name, state in saved["optimizer"]["state"].items()
               if "momentum_buffer" in state}
    assert buffers and all(buffers[name].shape == saved["model"][name].shape for name in buffers)


@pytest.mark.parametrize("flags, message", [
    (["--muon-lr", "-0.02"], "--muon-lr must be above 0, got -0.02"),
    (["--muon-ns-steps", "0"], "--muon-ns-steps must be at least 1, got 0"),
    (["--muon-ns-steps", "100"], "--muon-ns-steps must be at most 99, got 100"),
    (["--muon-momentum", "1"], "--muon-momentum must be below 1, got 1.0"),
    (["--muon-weight-decay", "-1"], "--muon-weight-decay must be at least 0, got -1.0"),
    (["--optimizer", "sgd"], "--optimizer: invalid choice: 'sgd'"),
    (["--muon-adjust-lr", "spectral"], "--muon-adjust-lr: invalid choice: 'spectral'"),
])
def test_bad_muon_options_are_one_line_errors(tiny_dataset, tmp_path, flags, message):
    out = tmp_path / "out"
    assert_user_error(run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY,
                          "--optimizer", "muon", *flags), message)
    assert not out.exists()


def two_rank_steps(rank: int, port: int, queue) -> None:
    """Three steps of two micro-batches each, with clipping, on this rank's own tokens; every rank's weights after."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model = tiny_model()
    _, net = distributed.wrap_model(model, distributed.World(rank, 2, torch.device("cpu")))
    optimizers = configure_optimizers(model, MUON, "cpu")
    tokens = torch.randint(0, CONFIG.vocab_size, (3, 2, 4, CONFIG.block_size + 1),
                           generator=torch.Generator().manual_seed(rank))
    for step_tokens in tokens:
        micro_batches = [(t[:, :-1], t[:, 1:]) for t in step_tokens]
        train_step(model, net, optimizers, NO_SCALING, micro_batches, 2, torch.autocast("cpu", enabled=False), 0.5)
    # As a list: a tensor would go through shared memory, which this process takes with it when it ends.
    queue.put((rank, torch.nn.utils.parameters_to_vector(model.parameters()).tolist()))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_ranks_take_the_same_muon_steps():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=two_rank_steps, args=(rank, port, queue)) for rank in range(2)]
    for p in processes:
        p.start()
    weights = dict(queue.get(timeout=120) for _ in processes)  # a rank that fails puts nothing
    for p in processes:
        p.join(timeout=120)
        assert p.exitcode == 0
    start = torch.nn.utils.parameters_to_vector(tiny_model().parameters()).tolist()
    assert weights[0] != start  # they trained
    assert weights[0] == weights[1]


def test_the_plot_names_each_runs_optimizer_and_draws_muons_rate(tmp_path):
    for name, optimizer in (("a", "adamw"), ("m", "muon")):
        config = {"options": {"data_dir": "d", "optimizer": optimizer}, "model": {"n_layer": 2, "n_embd": 32,
                                                                                   "block_size": 32}}
        logger = MetricsLogger(tmp_path / name, config=config)
        for step in range(0, 21, 5):
            muon = {"muon_lr": 0.02 * step / 20} if optimizer == "muon" else {}
            logger.log(step, {"train/loss": 5 - step / 10, "lr": 6e-3 * step / 20, **muon})
        logger.finish()
    fig = plot.figure([plot.read_run(tmp_path / name) for name in ("m", "a")])
    title = fig.texts[0].get_text()
    assert "a: " in title and "m: " in title and "AdamW, on d" in title and "Muon + AdamW, on d" in title
    lr_panel = fig.axes[1]
    assert [text.get_text() for text in lr_panel.get_legend().get_texts()] == ["m: AdamW", "m: Muon", "a: AdamW"]
    assert max(lr_panel.lines[1].get_ydata()) == 0.02
