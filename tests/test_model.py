"""The GPT on its eager ops: shapes, the tied head, GPT-2's initialisation, learning, sampling, MFU."""
import math

import pytest
import torch

from tritongpt.model import GPT, GPTConfig, preset
from tritongpt.model.gpt import sample_next_token


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
    optimizer = model.configure_optimizers(weight_decay=0.0, learning_rate=1e-2, betas=(0.9, 0.95), device_type="cpu")
    for _ in range(60):
        _, loss = model(idx[:, :-1], idx[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1


def test_weight_decay_only_on_matrices():
    model = tiny()
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
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


def test_flops_per_token():
    model = tiny()
    c = model.config
    assert model.flops_per_token() == 6 * model.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size
