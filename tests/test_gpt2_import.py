"""Importing Hugging Face GPT-2 weights reproduces transformers' GPT2LMHeadModel (a small random one: no download)."""
import pytest
import torch

from tritongpt.data.tokenizer import Tokenizer
from tritongpt.model import GPTConfig, load_gpt2
from tests.runs import TINY, assert_user_error, run
from tritongpt.checkpoint import load_checkpoint

transformers = pytest.importorskip("transformers")
TINY_OPTIONS = [arg for arg in TINY if arg not in ("--model", "tiny")]  # --init-from brings the model's shape


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=101, n_positions=48, n_embd=64, n_layer=3, n_head=4,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2's init leaves biases at zero: give them values so a transposed or dropped one shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def test_directory_import_matches_transformers_logits(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)  # config.json + model.safetensors
    ours = load_gpt2(tmp_path).eval()
    assert ours.config.n_layer == 3 and ours.config.block_size == 48 and ours.config.vocab_size == 101
    idx = torch.randint(0, 101, (2, 40))
    with torch.no_grad():
        expected = hf_model(idx).logits
        logits, _ = ours(idx)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_state_dict_file_import(hf_model, tmp_path):
    torch.save(hf_model.state_dict(), tmp_path / "gpt2.pt")
    config = GPTConfig(vocab_size=101, block_size=48, n_layer=3, n_head=4, n_embd=64)
    ours = load_gpt2(tmp_path / "gpt2.pt", config).eval()
    idx = torch.randint(0, 101, (1, 48))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf_model(idx).logits, rtol=1e-5, atol=1e-5)


def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no GPT-2 checkpoint"):
        load_gpt2(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor pytorch_model.bin"):
        load_gpt2(tmp_path)
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="not a GPT-2 config.json"):
        load_gpt2(tmp_path)


def save_with_the_datasets_tokenizer(model, path, dataset):
    """A GPT-2 directory whose tokenizer is the dataset's, as a fine-tuning run needs."""
    model.save_pretrained(path)
    (path / "tokenizer.json").write_text(Tokenizer(dataset / "tokenizer.model").huggingface_json())


def test_train_py_fine_tunes_from_a_gpt2_directory(tiny_dataset, tmp_path):
    config = transformers.GPT2Config(vocab_size=400, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    save_with_the_datasets_tokenizer(transformers.GPT2LMHeadModel(config), tmp_path / "gpt2", tiny_dataset)
    out = tmp_path / "out"
    result = run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *TINY_OPTIONS, "--max-iters", "1",
                 "--init-from", str(tmp_path / "gpt2"))
    assert result.returncode == 0, result.stderr
    ckpt = load_checkpoint(out)
    saved = ckpt["model_config"]
    assert (saved["n_layer"], saved["n_embd"], saved["block_size"]) == (2, 32, 64)
    # Fine-tuning's default peak rate: a twentieth of a new model's at this width, 6e-3 x 128 / 32, twice that for
    # AdamW beside Muon (the default); Muon's own, a twentieth of 0.01.
    assert ckpt["options"]["learning_rate"] == pytest.approx(6e-3 * 128 / 32 * 2 / 20)
    assert ckpt["options"]["muon_lr"] == pytest.approx(0.01 / 20)

    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=500, n_positions=64, n_embd=32, n_layer=2,
                                                         n_head=2)).save_pretrained(tmp_path / "other")
    mismatch = run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(tmp_path / "o2"), *TINY_OPTIONS,
                   "--init-from", str(tmp_path / "other"))
    assert mismatch.returncode == 2 and "has a 500-token vocabulary" in mismatch.stderr


def test_init_from_crops_the_context_and_refuses_other_shape_options(tiny_dataset, tmp_path):
    config = transformers.GPT2Config(vocab_size=400, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    hf = transformers.GPT2LMHeadModel(config)
    save_with_the_datasets_tokenizer(hf, tmp_path / "gpt2", tiny_dataset)
    common = ["--data-dir", str(tiny_dataset), "--init-from", str(tmp_path / "gpt2"), *TINY_OPTIONS, "--max-iters", "1",
              "--learning-rate", "1e-9"]
    out = tmp_path / "cropped"
    result = run("train.py", *common, "--out-dir", str(out), "--block-size", "16")
    assert result.returncode == 0, result.stderr
    ckpt = load_checkpoint(out)
    assert ckpt["model_config"]["block_size"] == 16
    # The first 16 learned positions, moved by at most one AdamW step (lr 1e-9, its weight decay negligible).
    torch.testing.assert_close(ckpt["model"]["transformer.wpe.weight"], hf.transformer.wpe.weight[:16].detach(),
                               rtol=0, atol=2e-9)

    assert_user_error(run("train.py", *common, "--out-dir", str(tmp_path / "o"), "--block-size", "65"),
                      "--block-size 65 is longer than the 64 positions")
    for flags in (["--n-layer", "4"], ["--model", "tiny"], ["--no-bias"]):
        assert_user_error(run("train.py", *common, "--out-dir", str(tmp_path / "o"), *flags),
                          "cannot be used with --init-from")
    assert not (tmp_path / "o").exists()
