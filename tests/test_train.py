"""train.py and sample.py end to end on a tiny dataset: checkpoints, exact resume, and every user mistake."""
import torch

from data.prepare import prepare
from tests.runs import TINY, assert_user_error, metrics, run, run_process, train_losses


def test_train_writes_a_checkpoint_that_sample_reads(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    result = run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, "--max-iters", "4",
                 "--eval-interval", "2", "--sample-tokens", "10")
    assert result.returncode == 0, result.stderr
    assert "--- sample ---" in result.stdout and "global batch: 4 sequences x 1 micro-batches" in result.stdout
    assert (out / "ckpt.pt").is_file() and (out / "loss_curve.png").is_file()
    assert sorted(train_losses(out)) == [1, 2, 3, 4]
    assert [m["step"] for m in metrics(out) if "val/loss" in m] == [0, 2, 4]
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert ckpt["iter_num"] == 4 and ckpt["model_config"]["n_layer"] == 2

    sampled = run("sample.py", "--checkpoint", str(out / "ckpt.pt"), "--prompt", "def add",
                  "--max-new-tokens", "12", "--num-samples", "2", "--seed", "3")
    assert sampled.returncode == 0, sampled.stderr
    assert sampled.stdout.count("def add") == 2 and "--- sample 2 ---" in sampled.stdout
    again = run("sample.py", "--checkpoint", str(out / "ckpt.pt"), "--prompt", "def add",
                "--max-new-tokens", "12", "--num-samples", "2", "--seed", "3")
    assert again.stdout == sampled.stdout  # same seed, same text


def test_resumed_training_matches_uninterrupted(tiny_dataset, tmp_path):
    common = ["--data-dir", str(tiny_dataset), *TINY, "--dropout", "0.1", "--grad-accum", "2",
              "--eval-interval", "3", "--lr-decay-iters", "6", "--warmup-iters", "2"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run("train.py", *common, "--out-dir", str(whole), "--max-iters", "6").returncode == 0
    assert run("train.py", *common, "--out-dir", str(parts), "--max-iters", "3").returncode == 0
    resumed = run("train.py", "--resume", "--out-dir", str(parts), "--max-iters", "6")
    assert resumed.returncode == 0, resumed.stderr

    assert train_losses(parts) == train_losses(whole)  # exactly: CPU, fp32, same data, same dropout masks
    a = torch.load(whole / "ckpt.pt", weights_only=True)["model"]
    b = torch.load(parts / "ckpt.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_inputs_give_one_line_errors_and_leave_files_alone(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    assert run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, "--max-iters", "1").returncode == 0
    ckpt = out / "ckpt.pt"
    before = ckpt.read_bytes()

    assert_user_error(run_process("train.py", "--no-such-option"), "unrecognized arguments: --no-such-option")
    assert_user_error(run("train.py", "--max-iters", "many"), "invalid int value: 'many'")
    assert_user_error(run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY,
                          "--n-embd", "48", "--n-head", "5"), "must be divisible by n_head")
    assert_user_error(run("train.py", "--data-dir", str(tmp_path / "none"), "--out-dir", str(out)),
                      "no dataset in")
    assert_user_error(run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY,
                          "--block-size", "100000"), "fewer than block_size + 1")
    assert_user_error(run("train.py", "--resume", "--out-dir", str(tmp_path / "empty")), "does not exist")
    assert_user_error(run("train.py", "--batch-size", "0"), "--batch-size must be at least 1, got 0")
    assert_user_error(run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY,
                          "--init-from", str(tmp_path / "no-gpt2")), "--init-from: no GPT-2 checkpoint")
    config = tmp_path / "config.json"
    config.write_text('{"max_iters": "ten"}')
    assert_user_error(run("train.py", "--config", str(config)), "max_iters must be int")
    config.write_text('{"learning_rte": 0.1}')
    assert_user_error(run("train.py", "--config", str(config)), "unknown option 'learning_rte'")
    assert_user_error(run("train.py", "--device", "cpu", "--dtype", "bfloat16", "--data-dir", str(tiny_dataset),
                          "--out-dir", str(out)), "needs a CUDA GPU")

    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(before[: len(before) // 2])
    assert_user_error(run_process("sample.py", "--checkpoint", str(truncated)), "not a readable checkpoint")
    assert_user_error(run("sample.py", "--checkpoint", str(tiny_dataset / "meta.json")), "not a readable checkpoint")
    assert_user_error(run("sample.py", "--checkpoint", str(tmp_path / "missing.pt")), "does not exist")
    other_tokenizer = tmp_path / "other"
    prepare([str(tiny_dataset.parent / "a.py")], out_dir=other_tokenizer, vocab_size=320, workers=1, progress=False)
    assert_user_error(run("sample.py", "--checkpoint", str(ckpt), "--tokenizer",
                          str(other_tokenizer / "tokenizer.model")), "has 320 tokens but the checkpoint's model has 400")
    assert_user_error(run("sample.py", "--checkpoint", str(ckpt), "--top-p", "1.5"), "--top-p must be in (0, 1]")
    assert_user_error(run("sample.py", "--checkpoint", str(ckpt), "--prompt-file", str(tmp_path / "nope.txt")),
                      "does not exist")

    assert ckpt.read_bytes() == before  # nothing above touched the checkpoint


def test_long_prompt_keeps_its_last_block_size_tokens(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    assert run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY, "--max-iters", "1").returncode == 0
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The quick brown fox — jumps over the lazy dog. " * 40)  # far beyond 64 tokens
    result = run("sample.py", "--checkpoint", str(out / "ckpt.pt"), "--prompt-file", str(prompt),
                 "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(prompt.read_text())
