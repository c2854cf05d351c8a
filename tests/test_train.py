"""train.py and sample.py end to end on a tiny dataset: checkpoints, exact resume, an earlier run never lost, and
every user mistake one line of error."""
import fcntl
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time

import pytest
import torch

from tritongpt import distributed
from tritongpt.checkpoint import load_checkpoint, save_checkpoint
from tritongpt.data.prepare import prepare
from tritongpt.files import DirectoryLock
from tritongpt.train_options import DEFAULT_DATA_DIR, TrainOptions, check_run
from tests.runs import (FINAL_CHECKPOINT, REPO, TINY, assert_resumed_run_matches_uninterrupted, assert_user_error,
                        metrics, run, run_process, snapshot, train_losses)


def test_train_writes_a_checkpoint_that_sample_reads(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    result = run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, "--max-iters", "4",
                 "--eval-interval", "2", "--sample-tokens", "10", "--sample-prompt", "class Stack")
    assert result.returncode == 0, result.stderr
    assert "--- sample ---\nclass Stack" in result.stdout
    assert "global batch: 4 sequences x 1 micro-batch x 64 tokens" in result.stdout
    assert "(1 process x 1 micro-batch each)" in result.stdout
    assert "mfu" not in result.stdout  # no known peak on a CPU: the column is left out
    assert (out / "checkpoints" / "latest").read_text() == "step_000004\n"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step_000004"]  # keeps 1
    assert (out / "training_curves.png").is_file()
    assert sorted(train_losses(out)) == [1, 2, 3, 4]
    assert [m["step"] for m in metrics(out) if "val/loss" in m] == [0, 2, 4]
    last_val = [m["val/loss"] for m in metrics(out) if "val/loss" in m][-1]
    assert f"final val loss {last_val:.3f}" in result.stdout
    ckpt = load_checkpoint(out)
    assert ckpt["iter_num"] == 4 and ckpt["model_config"]["n_layer"] == 2

    sampled = run("sample.py", "--checkpoint", str(out / "checkpoints" / "step_000004"), "--prompt", "def add",
                  "--max-new-tokens", "12", "--num-samples", "2", "--seed", "3")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.count("def add") == 2 and "--- sample 2 ---" in sampled.stdout
    again = run("sample.py", "--checkpoint", str(out), "--prompt", "def add",  # the run's latest checkpoint
                "--max-new-tokens", "12", "--num-samples", "2", "--seed", "3")
    assert again.returncode == 0, again.stderr
    assert again.stdout == sampled.stdout  # same seed, same text


def test_closing_sample_starts_a_new_document_unless_on_the_default_corpus(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    result = run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, "--max-iters", "1",
                 "--sample-tokens", "12")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["options"]["sample_prompt"] == ""
    # The same draw as sample.py's with no prompt (its sampling defaults are the closing sample's).
    fresh = run("sample.py", "--checkpoint", str(out), "--max-new-tokens", "12")
    assert fresh.returncode == 0, fresh.stderr
    assert result.stdout.endswith("--- sample ---\n" + fresh.stdout)

    world = distributed.World(rank=0, size=1, device=torch.device("cpu"))
    default_out = tmp_path / "default"
    with DirectoryLock(default_out) as lock:
        opts, *_ = check_run(TrainOptions(data_dir=DEFAULT_DATA_DIR, out_dir=str(default_out)), set(), world, lock)
    assert opts.sample_prompt == "def"


def test_resumed_training_matches_uninterrupted(tiny_dataset, tmp_path):
    # The same data and the same dropout masks too.
    _, output = assert_resumed_run_matches_uninterrupted(
        ["--data-dir", str(tiny_dataset), *TINY, "--dropout", "0.1", "--grad-accum", "2", "--eval-interval", "3",
         "--lr-decay-iters", "6", "--warmup-iters", "2"], tmp_path)
    assert "resuming from step 3 of 6" in output


def test_a_new_run_never_replaces_an_earlier_one_unasked(finished_run, tiny_dataset):
    out, args = finished_run
    before = snapshot(out)
    refused = run("train.py", *args)  # the same command again
    assert_user_error(refused, "already holds a run")
    assert "--resume" in refused.stderr and "--overwrite" in refused.stderr
    assert snapshot(out) == before

    # Resuming a finished run: already there, nothing rewritten.
    assert_user_error(run("train.py", "--resume", "--out-dir", str(out)), "already at step 2")
    assert_user_error(run("train.py", "--resume", "--out-dir", str(out), "--overwrite"), "not both")
    assert snapshot(out) == before

    # --overwrite starts over: none of the old run's lines or files survive.
    result = run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, "--max-iters", "1",
                 "--overwrite")
    assert result.returncode == 0, result.stderr
    assert sorted(train_losses(out)) == [1]
    assert load_checkpoint(out)["iter_num"] == 1


@pytest.mark.parametrize("flags, message", [
    (["--beta1", "1"], "--beta1 must be below 1"),
    (["--beta2", "-0.5"], "--beta2 must be at least 0"),
    (["--learning-rate", "0"], "--learning-rate must be above 0"),
    (["--learning-rate", "nan"], "invalid float value: 'nan'"),
    (["--learning-rate", "inf"], "invalid float value: 'inf'"),
    (["--weight-decay", "-0.1"], "--weight-decay must be at least 0"),
    (["--min-lr", "0.01", "--learning-rate", "0.001"], "--min-lr (0.01) must not exceed --learning-rate (0.001)"),
    # Unset, AdamW's peak rate follows the width: 6e-3 x 128 / 64 for the tiny preset, twice that beside Muon.
    (["--min-lr", "0.03"], "--min-lr (0.03) must not exceed --learning-rate (0.024)"),
    (["--min-lr", "0.02", "--optimizer", "adamw"], "--min-lr (0.02) must not exceed --learning-rate (0.012)"),
    (["--warmup-iters", "5", "--max-iters", "4"], "--warmup-iters (5) must not exceed --max-iters (4)"),
    (["--lr-decay-iters", "1", "--warmup-iters", "2"], "--lr-decay-iters (1) must be at least"),
    (["--dropout", "1"], "--dropout must be below 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--max-iters", "many"], "invalid int value: 'many'"),
    (["--bias=maybe"], "--bias: expected true or false, got 'maybe'"),
    (["--bias", "maybe"], "--bias: expected true or false, got 'maybe'"),
    (["--compile", "2"], "--compile: expected true or false, got '2'"),
    (["--no-bias", "false"], "--no-bias takes no value, got 'false'"),
    (["--n-embd", "48", "--n-head", "5"], "must be divisible by n_head"),
    (["--block-size", "100000"], "fewer than block_size + 1"),
    (["--device", "cpu", "--dtype", "bfloat16"], "needs a CUDA GPU"),
])
def test_bad_options_are_one_line_errors(tiny_dataset, tmp_path, flags, message):
    out = tmp_path / "out"
    assert_user_error(run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, *flags), message)
    assert not out.exists()  # refused before anything was written


def test_resume_refuses_shape_options_and_another_tokenizer(finished_run, tmp_path):
    out, _ = finished_run
    before = snapshot(out)
    for flags in (["--n-layer", "3"], ["--block-size", "32"], ["--no-bias"], ["--model", "mini"]):
        assert_user_error(run("train.py", "--resume", "--out-dir", str(out), "--max-iters", "4", *flags),
                          "cannot change a resumed run")
    other = tmp_path / "other"
    prepare([str(REPO / "README.md")], out_dir=other, vocab_size=400, workers=1, progress=False)
    assert_user_error(run("train.py", "--resume", "--out-dir", str(out), "--max-iters", "4", "--data-dir",
                          str(other)), "another tokenizer")
    assert snapshot(out) == before


def test_other_mistakes_are_one_line_errors(finished_run, tiny_dataset, tmp_path):
    out, args = finished_run
    before = snapshot(out)
    data = ["--data-dir", str(tiny_dataset), *TINY]
    assert_user_error(run_process("train.py", "--no-such-option"), "unrecognized arguments: --no-such-option")
    assert_user_error(run("train.py", "--data-dir", str(tmp_path / "none"), "--out-dir", str(tmp_path / "o")),
                      "no dataset in")
    assert_user_error(run("train.py", "--resume", "--out-dir", str(tmp_path / "empty")), "there is no run in")
    assert_user_error(run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(tmp_path / "o"),
                          "--init-from", str(tmp_path / "no-gpt2")), "--init-from: no GPT-2 checkpoint")
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    assert_user_error(run("train.py", *data, "--out-dir", str(a_file)), "is a file, not a directory")
    assert_user_error(run("train.py", *data, "--out-dir", str(a_file / "sub")), "cannot write in --out-dir")
    assert_user_error(run("train.py", *data, "--out-dir", "/proc/no-such-run"), "cannot write in --out-dir")
    config = tmp_path / "config.json"
    for text, message in (('{"max_iters": "ten"}', "max_iters must be int"),
                          ('{"learning_rte": 0.1}', "unknown option 'learning_rte'"),
                          ('{"learning_rate": NaN}', "learning_rate must be a finite number")):
        config.write_text(text)
        assert_user_error(run("train.py", "--config", str(config)), message)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "config.json", "run"]  # nothing else made


def test_bias_takes_a_value_as_well_as_no_bias(tiny_dataset, tmp_path):
    for flags in (["--bias", "false"], ["--bias=false"], ["--no-bias"]):
        out = tmp_path / "-".join(flags)
        result = run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, "--max-iters", "1",
                     *flags)
        assert result.returncode == 0, result.stderr
        assert json.loads((out / "config.json").read_text())["model"]["bias"] is False
        assert not any(name.endswith("bias") for name in load_checkpoint(out)["model"])


def test_a_diverging_run_stops_and_keeps_its_last_good_checkpoint(finished_run, tiny_dataset, tmp_path):
    out, args = finished_run
    before = snapshot(out)
    # A learning rate this large sends the weights to inf within a few steps (AdamW's decay alone multiplies them
    # by 1 - lr * 0.1 a step). The first look at the loss is at step 12, long after, where the checkpoint is due.
    diverged = run("train.py", "--resume", "--out-dir", str(out), "--max-iters", "12", "--learning-rate", "1e30",
                   "--warmup-iters", "0", "--eval-interval", "12", "--log-interval", "12", "--sample-tokens", "20")
    assert_user_error(diverged, "training diverged: the loss or gradient norm became inf or nan at step")
    first_bad = int(diverged.stderr.split("at step ")[1].split(";")[0])
    assert 3 <= first_bad < 12  # step 3 is the first to run on weights the huge rate has already moved
    assert f"{out / FINAL_CHECKPOINT}, holds step 2" in diverged.stderr
    assert {k: v for k, v in snapshot(out).items() if k.startswith("checkpoints/")} == \
        {k: v for k, v in before.items() if k.startswith("checkpoints/")}

    fresh = tmp_path / "fresh"
    result = run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(fresh), *TINY, "--max-iters", "12",
                 "--learning-rate", "1e30", "--warmup-iters", "0")
    assert_user_error(result, "no checkpoint was written")
    assert not (fresh / "checkpoints" / "latest").exists()


def test_sample_draws_its_samples_as_one_batch(finished_run):
    out, _ = finished_run

    def sample(*flags: str) -> str:
        result = run("sample.py", "--checkpoint", str(out), "--prompt", "def add", "--max-new-tokens", "8", *flags)
        assert result.returncode == 0, result.stderr
        return result.stdout

    # Greedy: each row of the batch continues the prompt as a lone sample does.
    one = sample("--temperature", "0")
    assert one.startswith("def add")
    assert sample("--temperature", "0", "--num-samples", "3") == "".join(f"--- sample {i} ---\n{one}" for i in (1, 2, 3))
    # Sampled: each row draws its own tokens.
    texts = re.split(r"--- sample \d ---\n", sample("--num-samples", "3"))
    assert texts[0] == "" and len(texts) == 4 and len(set(texts[1:])) == 3
    assert all(text.startswith("def add") for text in texts[1:])


def test_sampling_needs_no_dataset_and_refuses_a_diverged_checkpoint(finished_run, tiny_dataset, tmp_path):
    out, _ = finished_run
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    # The checkpoint carries its tokenizer: it samples with the dataset gone.
    data_copy = tmp_path / "data"
    shutil.copytree(tiny_dataset, data_copy)
    trained = tmp_path / "trained"
    assert run("train.py", "--data-dir", str(data_copy), "--out-dir", str(trained), *TINY,
               "--max-iters", "1").returncode == 0
    shutil.rmtree(data_copy)
    result = run("sample.py", "--checkpoint", str(trained), "--prompt", "def", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def")

    ckpt = load_checkpoint(moved)
    ckpt["model"]["lm_head.weight"][0, 0] = float("nan")
    torch.save(ckpt, moved / "diverged.pt")
    assert_user_error(run("sample.py", "--checkpoint", str(moved / "diverged.pt")), "inf or nan weights")


def test_sample_mistakes_are_one_line_errors(finished_run, tiny_dataset, tmp_path):
    out, _ = finished_run
    ckpt = out / FINAL_CHECKPOINT
    before = snapshot(out)
    single = tmp_path / "single.pt"
    save_checkpoint(single, load_checkpoint(out))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(single.read_bytes()[: single.stat().st_size // 2])
    assert_user_error(run_process("sample.py", "--checkpoint", str(truncated)), "not a readable checkpoint")
    torn = tmp_path / "torn"
    shutil.copytree(ckpt, torn)
    for shard in torn.glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:1000])  # sampling reads the model's tensors only: cut into them
    assert_user_error(run("sample.py", "--checkpoint", str(torn)), "not a readable checkpoint")
    (torn / ".metadata").write_bytes(b"\x80\x04cos\nsystem\n.")  # a pickle that would call os.system
    assert_user_error(run("sample.py", "--checkpoint", str(torn)), "which is not checkpoint metadata")
    assert_user_error(run("sample.py", "--checkpoint", str(tiny_dataset / "meta.json")), "not a readable checkpoint")
    assert_user_error(run("sample.py", "--checkpoint", str(tmp_path / "missing.pt")), "no checkpoint at")
    assert_user_error(run("sample.py", "--checkpoint", str(tmp_path)), "no checkpoint at")  # a directory without one
    other_tokenizer = tmp_path / "other"
    prepare([str(tiny_dataset.parent / "a.py")], out_dir=other_tokenizer, vocab_size=320, workers=1, progress=False)
    assert_user_error(run("sample.py", "--checkpoint", str(ckpt), "--tokenizer",
                          str(other_tokenizer / "tokenizer.model")), "has 320 tokens but the checkpoint's model has 400")
    assert_user_error(run("sample.py", "--checkpoint", str(ckpt), "--top-p", "1.5"), "--top-p must be in (0, 1]")
    assert_user_error(run("sample.py", "--checkpoint", str(ckpt), "--prompt-file", str(tmp_path / "nope.txt")),
                      "does not exist")
    assert snapshot(out) == before


def test_sample_refuses_another_tokenizer_of_the_same_size_unless_forced(finished_run, tiny_dataset, tmp_path):
    out, _ = finished_run
    before = snapshot(out)
    other = tmp_path / "other"
    prepare([str(REPO / "README.md")], out_dir=other, vocab_size=400, workers=1, progress=False)
    other_tokenizer = str(other / "tokenizer.model")
    sample_args = ["--checkpoint", str(out), "--prompt", "def", "--max-new-tokens", "3"]
    refused = run("sample.py", *sample_args, "--tokenizer", other_tokenizer)
    assert_user_error(refused, f"tokenizer {other_tokenizer} is not the one {out} was trained with")
    assert_user_error(refused, "add --force-tokenizer to use it anyway")
    forced = run("sample.py", *sample_args, "--tokenizer", other_tokenizer, "--force-tokenizer")
    assert forced.returncode == 0, forced.stderr
    # The very tokenizer the checkpoint carries, given as a file, needs no flag.
    own = run("sample.py", *sample_args, "--tokenizer", str(tiny_dataset / "tokenizer.model"))
    assert own.returncode == 0, own.stderr
    assert snapshot(out) == before


def test_sample_from_a_checkpoint_without_its_tokenizer_asks_for_one(finished_run, tiny_dataset, tmp_path):
    out, _ = finished_run
    ckpt = load_checkpoint(out)
    del ckpt["tokenizer"]
    bare = tmp_path / "bare.pt"
    torch.save(ckpt, bare)
    assert_user_error(run("sample.py", "--checkpoint", str(bare)),
                      f"{bare} carries no tokenizer; pass the one its model was trained with (--tokenizer")
    given = run("sample.py", "--checkpoint", str(bare), "--tokenizer", str(tiny_dataset / "tokenizer.model"),
                "--prompt", "def", "--max-new-tokens", "3")
    assert given.returncode == 0, given.stderr


def test_long_prompt_keeps_its_last_block_size_tokens(finished_run, tmp_path):
    out, _ = finished_run
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox — jumps over the lazy dog. " * 40)  # far beyond 64 tokens
    result = run("sample.py", "--checkpoint", str(out / FINAL_CHECKPOINT), "--prompt-file", str(prompt),
                 "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(prompt.read_text())


@pytest.mark.slow
def test_log_and_evaluation_lines_never_break_the_progress_bar(tiny_dataset, tmp_path):
    """On a terminal the progress bar redraws its line in place; a line printed past it would be glued to the bar's
    text. So every log and evaluation line must start a line of its own."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a new terminal has no width
    proc = subprocess.Popen([sys.executable, "train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(tmp_path / "out"),
                             *TINY, "--max-iters", "6", "--eval-interval", "2", "--log-interval", "3"],
                            cwd=REPO, stdin=follower, stdout=follower, stderr=follower, env={**os.environ, "TERM": "xterm"})
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closes when the process ends
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert proc.wait(timeout=240) == 0, output.decode(errors="replace")[-2000:]
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", output.decode(errors="replace"))  # cursor moves, line clears
    assert "%|" in text  # the bar was drawn
    pieces = [piece.strip(" ") for piece in re.split(r"[\r\n]", text)]
    ours = [piece for piece in pieces if "val loss" in piece or "tok/s" in piece]
    assert len(ours) == 4 + 2 + 1, ours  # evaluations at steps 0, 2, 4, 6; log lines at steps 3, 6; the final loss
    assert all(piece.startswith(("step ", "final val loss")) for piece in ours), ours


def test_ctrl_c_during_a_checkpoint_write_takes_effect_once_it_is_written():
    from tritongpt.checkpoint import interrupts_deferred
    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal is delivered here, and must not interrupt the block
            done.append("written")
    assert done == ["written"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Ctrl-C works as before afterwards


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    from tritongpt.files import atomic_file
    path = tmp_path / "ckpt.pt"
    path.write_bytes(b"the good checkpoint")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as f:
            f.write(b"half of a new one")
            raise RuntimeError("the disk filled up")
    assert path.read_bytes() == b"the good checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind
    with atomic_file(path) as f:
        f.write(b"a whole new one")
    assert path.read_bytes() == b"a whole new one" and [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
