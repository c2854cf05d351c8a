"""The Hugging Face round trip, offline: a dataset encoded with a GPT-2-style byte-level BPE tokenizer (trained here
with `tokenizers`), checkpoints that carry it, and `python -m tritongpt.export` to a directory that transformers
loads with our logits, our greedy tokens and our token ids."""
import json
import random

import pytest
import torch

from tritongpt.checkpoint import load_checkpoint, unpack_tokenizer
from tritongpt.data.loader import TokenWindows
from tritongpt.data.prepare import train_tokenizer
from tritongpt.data.tokenizer import HuggingFaceTokenizer, Tokenizer, load_tokenizer
from tritongpt.model import GPT, GPTConfig
from tests.conftest import TINY_CORPUS, write_tiny_corpus
from tests.runs import TINY, assert_user_error, run, snapshot, split_ids, train_losses

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
safetensors_torch = pytest.importorskip("safetensors.torch")

# Accents (composed and combining), CJK, emoji (a ZWJ sequence too), tabs, leading and repeated spaces, newlines,
# sentencepiece's own space mark, a no-break space, characters no vocabulary here holds (byte fallback), a NUL.
TEXTS = ["café naïve Ünïcödé — e\u0301", "漢字 and 日本語のテキスト", "emoji 🎉 👩‍👩‍👧 done",
         "\tdef f(x):\n\t\treturn x\n", "   leading spaces", "a    b  c", "\n\n\nnewlines\n\n", "▁mark ▁▁ two",
         "no\u00a0break", "Ωμέγα ∑ ∫ ☃ ℵ", "nul\x00 bom\ufeff", " ", ""]
EXPORT_FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Random strings over letters, whitespace and the characters of TEXTS."""
    alphabet = sorted(set("abcdef xyz():=\t\n") | set("".join(TEXTS)))
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("hf-corpus"))


@pytest.fixture(scope="module")
def gpt2_tokenizer_dir(corpus, tmp_path_factory):
    """A GPT-2-style byte-level BPE tokenizer trained on the tiny corpus, saved as GPT-2's are: vocab.json and
    merges.txt, its end-of-text token <|endoftext|>."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(TINY_CORPUS.values(), vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False)
    out = tmp_path_factory.mktemp("gpt2-tokenizer")
    bpe.save_model(str(out))
    assert sorted(p.name for p in out.iterdir()) == ["merges.txt", "vocab.json"]
    return out


@pytest.fixture(scope="module")
def gpt2_fast(gpt2_tokenizer_dir):
    return transformers.GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_dir)


@pytest.fixture(scope="module")
def bpe_dataset(corpus, gpt2_tokenizer_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe") / "dataset"
    result = run("data/prepare.py", *[str(corpus / name) for name in TINY_CORPUS], "--out-dir", str(out),
                 "--tokenizer", str(gpt2_tokenizer_dir), "--val-fraction", "0.34", "--workers", "1")
    assert result.returncode == 0, result.stderr
    return out


def train_run(dataset, out, *flags):
    """Long enough that the next token's logits stand apart, so that greedy decoding meets no near-tie."""
    result = run("train.py", "--data-dir", str(dataset), "--out-dir", str(out), *TINY, "--max-iters", "20",
                 "--eval-interval", "20", *flags)
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def bpe_run(bpe_dataset, tmp_path_factory):
    return train_run(bpe_dataset, tmp_path_factory.mktemp("bpe-run") / "out")


@pytest.fixture(scope="module")
def sentencepiece_run(tiny_dataset, tmp_path_factory):
    """A model without biases, which GPT-2's class has: it exports with zero ones."""
    return train_run(tiny_dataset, tmp_path_factory.mktemp("sp-run") / "out", "--no-bias")


def export(*args: str):
    return run("-m tritongpt.export", *args)


def our_model(run_dir) -> GPT:
    ckpt = load_checkpoint(run_dir)
    model = GPT(GPTConfig.from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def split_documents(dataset, split, eot_id) -> list[tuple[int, ...]]:
    ids = split_ids(dataset / "meta.json", split).tolist()
    docs, start = [], 0
    for i, token in enumerate(ids):
        if token == eot_id:
            docs.append(tuple(ids[start:i]))
            start = i + 1
    assert start == len(ids)  # every document ends with the end-of-text token
    return docs


def test_prepare_with_a_gpt2_tokenizer_encodes_as_transformers(bpe_dataset, gpt2_fast, gpt2_tokenizer_dir):
    meta = json.loads((bpe_dataset / "meta.json").read_text())
    eot = gpt2_fast.convert_tokens_to_ids("<|endoftext|>")
    assert (meta["tokenizer"], meta["tokenizer_kind"], meta["eot_id"]) == ("tokenizer.json", "huggingface", eot)
    assert meta["vocab_size"] == len(gpt2_fast)
    docs = [d for split in ("train", "val") for d in split_documents(bpe_dataset, split, eot)]
    assert sorted(docs) == sorted(tuple(gpt2_fast.encode(text)) for text in TINY_CORPUS.values())
    # The dataset's copy is the same tokenizer, on any text.
    copy, original = load_tokenizer(bpe_dataset / meta["tokenizer"], meta["eot_id"]), load_tokenizer(gpt2_tokenizer_dir)
    for text in TEXTS + random_texts(200):
        assert copy.encode(text) == original.encode(text) == gpt2_fast.encode(text)
        assert copy.decode(copy.encode(text)) == text


def test_prepare_refuses_a_directory_without_a_tokenizer_in_one_line(corpus, tmp_path):
    result = run("data/prepare.py", str(corpus / "a.py"), "--out-dir", str(tmp_path / "d"), "--tokenizer", str(tmp_path))
    assert_user_error(result, f"{tmp_path} holds no Hugging Face tokenizer: give a directory with tokenizer.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_checkpoint_trained_on_it_samples_text_decoded_by_it(bpe_run, gpt2_fast):
    ckpt = load_checkpoint(bpe_run)
    assert ckpt["tokenizer"]["kind"] == "huggingface"
    eot = gpt2_fast.convert_tokens_to_ids("<|endoftext|>")
    sampled = run("sample.py", "--checkpoint", str(bpe_run), "--prompt", "def add", "--max-new-tokens", "12",
                  "--temperature", "0", "--device", "cpu")
    assert sampled.returncode == 0, sampled.stderr
    prompt = torch.tensor([[eot] + gpt2_fast.encode("def add")])
    new = our_model(bpe_run).generate(prompt, 12, temperature=0)[0, prompt.shape[1]:].tolist()
    new = new[:new.index(eot)] if eot in new else new
    assert sampled.stdout == "def add" + gpt2_fast.decode(new) + "\n"


def gpt2_directory(path, vocab_size: int, tokenizer_json: str | None):
    config = transformers.GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    if tokenizer_json is not None:
        (path / "tokenizer.json").write_text(tokenizer_json)
    return path


def test_init_from_refuses_a_same_size_tokenizer_with_other_tokens(tiny_dataset, tmp_path):
    ours = Tokenizer(tiny_dataset / "tokenizer.model")
    spec = json.loads(ours.huggingface_json())
    vocab = spec["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[-2:]  # two of its tokens, numbered the other way round
    vocab[a], vocab[b] = vocab[b], vocab[a]
    common = ["--data-dir", str(tiny_dataset), *[f for f in TINY if f not in ("--model", "tiny")], "--max-iters", "1"]
    swapped = gpt2_directory(tmp_path / "swapped", ours.vocab_size, json.dumps(spec))
    refused = run("train.py", *common, "--out-dir", str(tmp_path / "o"), "--init-from", str(swapped))
    assert_user_error(refused, f"encoded with another tokenizer than --init-from {swapped}'s")
    assert_user_error(refused, f"python data/prepare.py YOUR_TEXT --tokenizer {swapped} --out-dir NEW_DIR")
    bare = gpt2_directory(tmp_path / "bare", ours.vocab_size, None)
    assert_user_error(run("train.py", *common, "--out-dir", str(tmp_path / "o"), "--init-from", str(bare)),
                      "holds no Hugging Face tokenizer")
    assert not (tmp_path / "o").exists()
    own = gpt2_directory(tmp_path / "own", ours.vocab_size, ours.huggingface_json())
    accepted = run("train.py", *common, "--out-dir", str(tmp_path / "o"), "--init-from", str(own))
    assert accepted.returncode == 0, accepted.stderr


@pytest.mark.parametrize("which", ["sentencepiece", "bpe"])
def test_export_loads_in_transformers_with_our_logits_tokens_and_ids(which, sentencepiece_run, bpe_run, tmp_path):
    run_dir = {"sentencepiece": sentencepiece_run, "bpe": bpe_run}[which]
    out = tmp_path / "export"
    result = export(str(run_dir), "--to", str(out))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == EXPORT_FILES
    ckpt = load_checkpoint(run_dir)
    ours = our_model(run_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied
    if which == "sentencepiece":  # trained without biases: the file holds zero ones, as GPT-2's class has them
        assert not ckpt["model_config"]["bias"]
        weights = safetensors_torch.load_file(out / "model.safetensors")
        biases = [name for name in hf.state_dict() if name.endswith(".bias")]
        assert len(biases) == 6 * ours.config.n_layer + 1 and not any(weights[name].any() for name in biases)
    idx = torch.randint(0, ours.config.vocab_size, (2, ours.config.block_size),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx, return_logits=True)[0], rtol=1e-5, atol=1e-5)

    our_tokenizer = unpack_tokenizer(ckpt, run_dir)
    eot = our_tokenizer.eot_id
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == eot
    prompt = torch.tensor([[eot, 5, 17, 42]])
    expected = ours.generate(prompt, 20, temperature=0)
    got = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, min_new_tokens=20,
                      do_sample=False, eos_token_id=None, pad_token_id=eot)
    assert got.tolist() == expected.tolist()

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tokenizer.eos_token_id == eot
    for text in TEXTS + random_texts(300):
        ids = our_tokenizer.encode(text)
        assert hf_tokenizer.encode(text) == ids, text
        assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer.decode([eot] + our_tokenizer.encode("def"), skip_special_tokens=True) == "def"


def test_export_then_init_from_starts_at_the_original_loss(sentencepiece_run, tiny_dataset, tmp_path):
    exported = tmp_path / "export"
    assert export(str(sentencepiece_run), "--to", str(exported)).returncode == 0
    out = tmp_path / "fine-tune"
    flags = [f for f in TINY if f not in ("--model", "tiny")]
    result = run("train.py", "--data-dir", str(tiny_dataset), "--out-dir", str(out), *flags, "--max-iters", "1",
                 "--init-from", str(exported), "--seed", "7")
    assert result.returncode == 0, result.stderr
    # The first step's batch, drawn as train.py draws it, through the original checkpoint's model.
    meta = json.loads((tiny_dataset / "meta.json").read_text())
    model = our_model(sentencepiece_run)
    windows = TokenWindows(TokenWindows.split_files(tiny_dataset, meta, "train"), meta["dtype"], meta["vocab_size"], meta["train_tokens"],
                           model.config.block_size, micro_batch=4, seed=7)
    x, y = windows.fetch(windows.next_step()[0])
    with torch.no_grad():
        expected = model(x, y)[1].item()
    assert train_losses(out)[1] == pytest.approx(expected, rel=1e-5)


def test_export_mistakes_are_one_line_errors(sentencepiece_run, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert_user_error(export(str(sentencepiece_run), "--to", str(taken)), f"--to {taken} already exists")
    assert snapshot(taken) == {"notes.txt": b"mine"}
    assert_user_error(export(str(tmp_path / "nowhere"), "--to", str(tmp_path / "x")),
                      "train one with `python train.py`")
    assert_user_error(export(str(sentencepiece_run)), "give one checkpoint and where to write it")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


@pytest.mark.parametrize("model_type", ["bpe", "unigram", "char"])
def test_sentencepiece_in_hugging_face_form_encodes_and_decodes_as_ours(model_type):
    lines = [line for text in TINY_CORPUS.values() for line in text.splitlines() if line] * 3
    ours = Tokenizer(train_tokenizer(lines, 320, model_type, progress=False))
    theirs = HuggingFaceTokenizer(ours.huggingface_json().encode())
    assert (theirs.vocab_size, theirs.eot_id) == (ours.vocab_size, ours.eot_id)
    for text in TEXTS + random_texts(500, seed=1):
        assert theirs.encode(text) == ours.encode(text), text
        assert theirs.decode(ours.encode(text)) == ours.decode(ours.encode(text)) == text
