"""The GPT on its eager ops: shapes, the tied head, GPT-2's initialisation, learning, sampling, MFU."""
import math

import pytest
import torch

from tritongpt.model import GPT, GPTConfig, preset
from tritongpt.model.gpt import sample_next_token
from tritongpt.optim import adamw


def tiny(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**dict(vocab_size=97, block_size=32, n_layer=2, n_head=2, n_embd=32), **overrides}))


def test_shapes_and_loss():
    model = tiny()
    idx = torch.randint(0, 97, (3, 20))
    logits, loss = model(idx)
    assert logits.shape == (3, 20, 97) and loss is None
    _, loss = model(idx, idx)
    assert loss.shape == () and math.isfinite(loss.item())
    # An untrained model is close to uniform over the vocabulary.
    assert abs(loss.item() - math.log(97)) < 0.5


def test_targets_of_minus_one_are_ignored():
    model = tiny()
    idx = torch.randint(0, 97, (2, 10))
    targets = idx.clone()
    targets[:, 5:] = -1
    _, masked = model(idx, targets)
    logits, _ = model(idx)
    expected = torch.nn.functional.cross_entropy(logits[:, :5].reshape(-1, 97), idx[:, :5].reshape(-1))
    torch.testing.assert_close(masked, expected)


def test_lm_head_is_tied_to_token_embedding():
    model = tiny()
    assert model.lm_head.weight is model.transformer.wte.weight
    idx = torch.randint(0, 97, (2, 8))
    model(idx, idx)[1].backward()
    assert model.transformer.wte.weight.grad is not None
    # Counted once: the parameter list holds the shared matrix a single time.
    assert sum(p is model.lm_head.weight for p in model.parameters()) == 1


def test_gpt2_initialisation_statistics():
    torch.manual_seed(0)
    n_layer = 6
    model = GPT(GPTConfig(vocab_size=5000, block_size=256, n_layer=n_layer, n_head=4, n_embd=256))
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight"):
            expected = 0.02 / math.sqrt(2 * n_layer)
        elif p.dim() == 2:
            expected = 0.02
        elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            assert torch.all(p == 1), name
            continue
        else:  # biases and LayerNorm shifts
            assert torch.all(p == 0), name
            continue
        assert abs(p.std().item() - expected) < 0.05 * expected, (name, p.std().item(), expected)
        assert abs(p.mean().item()) < 0.05 * expected, name


def test_overfits_one_batch():
    model = tiny(dropout=0.0)
    torch.manual_seed(1)
    idx = torch.randint(0, 97, (4, 32))
    optimizer = adamw(model.parameters(), weight_decay=0.0, learning_rate=1e-2, betas=(0.9, 0.95), device_type="cpu")
    for _ in range(60):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_weight_decay_only_on_matrices():
    model = tiny()
    optimizer = adamw(model.parameters(), 0.1, 1e-3, (0.9, 0.95), "cpu")
    decayed, plain = optimizer.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_presets_have_gpt2_parameter_counts():
    # The counts OpenAI's released checkpoints have (tied head counted once).
    published = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080,
                 "gpt2-xl": 1_557_611_200}
    for name, count in published.items():
        with torch.device("meta"):
            assert GPT(preset(name, vocab_size=50257)).num_params(non_embedding=False) == count, name


def test_config_rejects_heads_not_dividing_width():
    with pytest.raises(ValueError, match="divisible by n_head"):
        GPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="attention must be one of"):
        GPTConfig(attention="cuda")


def test_config_takes_an_alternative_only_for_its_op():
    assert GPTConfig(attention="sdpa").attention == "sdpa"
    with pytest.raises(ValueError, match=r"layernorm must be one of \('torch', 'triton'\), got 'sdpa'"):
        GPTConfig(layernorm="sdpa")


def test_context_longer_than_block_size_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="longer than the model's block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_generate_crops_context_and_is_reproducible():
    model = tiny().eval()
    idx = torch.randint(0, 97, (2, 40))  # longer than block_size: generate keeps the last 32
    a = model.generate(idx, 5, temperature=0.9, top_k=10, generator=torch.Generator().manual_seed(3))
    b = model.generate(idx, 5, temperature=0.9, top_k=10, generator=torch.Generator().manual_seed(3))
    assert a.shape == (2, 45) and torch.equal(a, b) and torch.equal(a[:, :40], idx)


def test_greedy_sampling_picks_the_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next_token(logits, 0.0, None, None, None), logits.argmax(-1))


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    top_k = {int(sample_next_token(logits, 1.0, 2, None, g)) for _ in range(300)}
    assert top_k == {0, 1}
    top_p = {int(sample_next_token(logits, 1.0, None, 0.7, g)) for _ in range(300)}
    assert top_p == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7: the third token is out
    only_first = {int(sample_next_token(logits, 1.0, None, 0.4, g)) for _ in range(50)}
    assert only_first == {0}


def draws(logits: torch.Tensor, n: int, temperature: float, top_k: int | None, top_p: float | None,
          seed: int = 0) -> torch.Tensor:
    """n tokens drawn in one call, from n copies of one row of logits."""
    return sample_next_token(logits.expand(n, -1), temperature, top_k, top_p, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_top_k_draws_the_k_most_likely_tokens_with_their_softmax_probabilities(dtype):
    # Distinct logits, exact in bf16 too, in shuffled order: the five largest are 2.25, 2.0, ..., 1.25.
    torch.manual_seed(0)
    logits = torch.randperm(50) * 0.25 - 10.0
    top = torch.topk(logits, 5)
    n = 20000
    tokens = draws(logits.to(dtype), n, 0.8, 5, None)
    assert set(tokens.tolist()) == set(top.indices.tolist())
    frequency = torch.bincount(tokens, minlength=50)[top.indices] / n
    # Binomial frequencies: each within 5 standard deviations (at most 5 * sqrt(0.25 / n) < 0.018) of its probability.
    torch.testing.assert_close(frequency, (top.values / 0.8).softmax(-1), atol=0.018, rtol=0)


def test_top_p_keeps_the_smallest_set_of_the_top_k_candidates_that_reaches_p():
    # Probabilities 0.4, 0.3, 0.2, 0.1 at shuffled ids. Among all four, the two most likely reach only 0.7, so top_p
    # 0.75 keeps three; among the top three, renormalised to 4/9, 3/9, 2/9, the first two reach 7/9 and stay alone.
    ids = torch.tensor([3, 0, 2, 1])
    logits = torch.empty(4)
    logits[ids] = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    n = 20000
    assert set(draws(logits, n, 1.0, None, 0.75).tolist()) == {3, 0, 2}
    tokens = draws(logits, n, 1.0, 3, 0.75)
    assert set(tokens.tolist()) == {3, 0}
    assert abs((tokens == 3).float().mean().item() - 4 / 7) < 0.018  # renormalised again over the two kept


@pytest.mark.parametrize("top_k", [None, 50])
def test_a_temperature_near_zero_draws_the_most_likely_token(top_k):
    logits = torch.randn(8, 500, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1)
    logits[torch.arange(8), best] += 0.1  # a margin that 1e-3 turns into a factor of e^100
    assert torch.equal(sample_next_token(logits, 1e-3, top_k, None, torch.Generator().manual_seed(1)), best)


def test_draws_repeat_with_the_seed():
    logits = torch.randn(500)
    assert torch.equal(draws(logits, 64, 1.0, 100, 0.9, seed=3), draws(logits, 64, 1.0, 100, 0.9, seed=3))
    assert not torch.equal(draws(logits, 64, 1.0, 100, 0.9, seed=3), draws(logits, 64, 1.0, 100, 0.9, seed=4))


def test_flops_per_token():
    model = tiny()
    c = model.config
    assert model.flops_per_token() == 6 * model.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size
