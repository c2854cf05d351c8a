"""Generation with the KV cache: the same hidden states and tokens as full forwards while the sequence fits in
block_size, the documented context past it, reproducible sampling, and batched text that stops per row."""
import io

import pytest
import torch
import torch.nn as nn

from tritongpt.model import GPT, GPTConfig
from tritongpt.model.gpt import sample_next_token
from tritongpt.textgen import stream_text

BLOCK_SIZE = 16
IMPLEMENTATIONS = ["torch", "sdpa", "triton"]


def tiny(attention: str = "torch", sharp: bool = False) -> GPT:
    """A tiny model; sharp: with its matrices 5x GPT-2's initial scale, so that the next token depends on the context
    more than on the last token alone, and a token computed from the wrong context shows."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=BLOCK_SIZE, n_layer=2, n_head=2, n_embd=32, attention=attention))
    if sharp:
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(5 if p.dim() == 2 else 1)
    return model.eval()


@pytest.mark.parametrize("attention", IMPLEMENTATIONS)
@torch.no_grad()
def test_cached_passes_give_the_full_forward_hidden_states(attention):
    model = tiny(attention)
    idx = torch.randint(0, 97, (2, BLOCK_SIZE))
    full = model.hidden_states(idx)
    cache = model.new_cache(2)
    # A prompt, a chunk of 3 (several queries against more keys), then one token at a time up to block_size.
    pieces = [idx[:, :9], idx[:, 9:12], *idx[:, 12:].split(1, dim=1)]
    cached = torch.cat([model.hidden_states(piece, cache) for piece in pieces], dim=1)
    assert cache.length == BLOCK_SIZE
    # fp32 both ways; the matrix products differ only in how many rows they take at once.
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", IMPLEMENTATIONS)
def test_greedy_tokens_with_the_cache_equal_those_of_full_forwards(attention):
    model = tiny(attention, sharp=True)
    idx = torch.randint(0, 97, (3, 11))
    new = BLOCK_SIZE - 11 + 1  # the last of them is predicted from exactly block_size tokens
    cached = model.generate(idx, new, temperature=0)
    assert torch.equal(cached, model.generate(idx, new, temperature=0, use_cache=False))
    assert cached.shape == (3, 11 + new)


def test_past_block_size_the_cache_is_refilled_from_the_last_half():
    model = tiny(sharp=True)
    prompt = torch.randint(0, 97, (2, 5))

    def sampler():
        return dict(temperature=1.0, generator=torch.Generator().manual_seed(7))

    seq = model.generate(prompt, 40, **sampler())
    # Documented: the first pass reads the prompt, each token then adds one position until block_size; a full cache is
    # refilled from the last half of block_size, and so on. Draw each token again from a full forward over that window.
    expected, context, sampling = [], 5, sampler()
    for end in range(5, 5 + 40):
        if context > BLOCK_SIZE:
            context = BLOCK_SIZE // 2
        logits = model(seq[:, end - context:end])[0][:, -1]
        expected.append(sample_next_token(logits, top_k=None, top_p=None, **sampling))
        context += 1
    assert torch.equal(seq[:, 5:], torch.stack(expected, dim=1))
    # The window is what tells the two paths apart past block_size (and only there).
    uncached = model.generate(prompt, 40, use_cache=False, **sampler())
    fits = BLOCK_SIZE - 5 + 1
    assert torch.equal(seq[:, :5 + fits], uncached[:, :5 + fits]) and not torch.equal(seq, uncached)


def test_sampling_is_reproducible_and_matches_the_uncached_path():
    model = tiny()
    idx = torch.randint(0, 97, (4, 3))

    def sample(**kwargs):
        return model.generate(idx, 12, temperature=1.0, top_k=20, generator=torch.Generator().manual_seed(5), **kwargs)

    first = sample()
    assert torch.equal(first, sample())
    assert torch.equal(first, sample(use_cache=False))
    assert not torch.equal(first[0], first[1])  # rows draw their own tokens


def test_column_major_weights_keep_their_values_and_the_tokens():
    model = tiny(sharp=True)
    idx = torch.randint(0, 97, (3, 5))
    before = {name: p.clone() for name, p in model.named_parameters()}
    rows = model.generate(idx, 8, temperature=0)
    model.column_major_()
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied
    assert model.lm_head.weight.stride() == (1, 97) and model.transformer.h[0].mlp.c_fc.weight.stride() == (1, 128)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert torch.equal(model.generate(idx, 8, temperature=0), rows)
    assert torch.equal(model.generate(idx, 8, temperature=0, use_cache=False), rows)


def test_cache_takes_the_autocast_dtype():
    model = tiny()
    assert model.new_cache(1).layers[0].k.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.new_cache(1).layers[0].k.dtype == torch.bfloat16
        out = model.generate(torch.zeros(2, 3, dtype=torch.long), 4, temperature=0)
    assert out.shape == (2, 7)


def test_generation_casts_each_mlp_weight_once(monkeypatch):
    """Under autocast, the Triton MLP's fp32 weights are cast once for the whole call, not once per token."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=BLOCK_SIZE, n_layer=2, n_head=2, n_embd=32, mlp="triton")).eval()
    casts = []
    make_cast = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda t, *args, **kwargs: (
        casts.append(t) if isinstance(t, nn.Parameter) else None) or make_cast(t, *args, **kwargs))
    with torch.autocast("cpu", dtype=torch.float16):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 5, temperature=0)
    mlp_weights = [p for block in model.transformer.h for p in block.mlp.parameters()]
    assert len(casts) == len(mlp_weights) == 8 and {id(t) for t in casts} == {id(p) for p in mlp_weights}


def test_cache_refuses_positions_past_block_size():
    model = tiny()
    cache = model.new_cache(1)
    model.hidden_states(torch.zeros(1, BLOCK_SIZE - 2, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="3 tokens after the 14 in the cache pass the model's block_size 16"):
        model.hidden_states(torch.zeros(1, 3, dtype=torch.long), cache)


class Scripted:
    """A stand-in model whose generate_tokens yields fixed rows of tokens, recording the batch it was given."""

    def __init__(self, steps: list[list[int]]):
        self.steps = steps
        self.batch = None
        self.taken = 0

    def generate_tokens(self, idx, max_new_tokens, **sampling):
        self.batch = idx
        for step in self.steps[:max_new_tokens]:
            self.taken += 1
            yield torch.tensor(step)


class Letters:
    """A tokenizer of one letter a token, with 0 as the end of a document."""
    eot_id = 0

    def decode(self, ids):
        return "".join(chr(ord("a") + i - 1) for i in ids)


def test_stream_text_streams_the_first_sample_and_stops_each_at_its_document_end():
    model = Scripted([[1, 2, 3], [2, 0, 3], [3, 1, 0], [0, 2, 2], [4, 4, 4]])
    out = io.StringIO()
    texts = stream_text(model, Letters(), [7, 8], 10, torch.device("cpu"), num_samples=3, out=out)
    assert model.batch.tolist() == [[7, 8]] * 3
    assert texts == ["abc", "b", "cc"]  # nothing after a row's end of document
    assert out.getvalue() == "abc\n"
    assert model.taken == 4  # stops once every row has ended
