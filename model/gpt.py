"""A GPT-2 language model, readable top to bottom.

Each op (attention, LayerNorm, MLP, and the LM head with its cross-entropy loss) runs on the implementation the
config names from kernels.OPS: "torch", the plain PyTorch reference in `kernels/`, "triton", the Triton kernel beside
it, or a named alternative ("sdpa": PyTorch's fused attention). All compute the same function; the parity tests hold
them to the reference.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from tritongpt import kernels
from tritongpt.model.config import GPTConfig


@dataclass
class LayerKV:
    """One layer's keys and values, (B, n_head, block_size, head_dim) each, allocated once; the first `length`
    positions hold those of the tokens seen so far."""
    k: torch.Tensor
    v: torch.Tensor
    length: int = 0

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the keys and values (B, n_head, T, head_dim) of the next T positions; return all so far."""
        start, self.length = self.length, self.length + k.shape[2]
        self.k[:, :, start:self.length] = k
        self.v[:, :, start:self.length] = v
        return self.k[:, :, :self.length], self.v[:, :, :self.length]


@dataclass
class KVCache:
    """The keys and values of every layer for the tokens seen so far (GPT.new_cache makes one), so that each new token
    runs through the model alone (see GPT.hidden_states)."""
    layers: list[LayerKV]

    @property
    def length(self) -> int:
        return self.layers[0].length

    def clear(self) -> None:
        for layer in self.layers:
            layer.length = 0


class AddLayerNorm(nn.Module):
    """The residual add and the LayerNorm after it, in one pass over x: returns (LayerNorm(x + update), x + update),
    or (LayerNorm(x), x) when there is no update."""

    def __init__(self, ndim: int, bias: bool, impl: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None
        self.layer_norm = kernels.OPS["layer_norm"].implementations[impl]
        self.add_layer_norm = kernels.OPS["add_layer_norm"].implementations[impl]

    def forward(self, x: torch.Tensor, update: torch.Tensor | None = None):
        # Under autocast the stream x stays fp32 while a sub-layer returns bf16/fp16: the op adds in x's precision and
        # writes the normed output in the autocast dtype the next matmul reads, with no cast pass on either side.
        device = x.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        if update is None:
            return self.layer_norm(x, self.weight, self.bias, out_dtype=out_dtype), x
        return self.add_layer_norm(update, x, self.weight, self.bias, out_dtype=out_dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.attend_packed = kernels.OPS["attention_qkvpacked"].implementations[config.attention]
        self.attend = kernels.OPS["attention"].implementations[config.attention]

    def forward(self, x: torch.Tensor, kv: LayerKV | None = None) -> torch.Tensor:
        if kv is None:
            # The fused projection [q | k | v] goes to the attention whole, which splits and merges the heads (the
            # Triton kernel as views, and its backward writes one gradient for the three): (B, T, 3C) -> (B, T, C).
            y = self.attend_packed(self.c_attn(x), self.n_head, causal=True)
        else:
            B, T, C = x.shape
            q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                       for t in self.c_attn(x).split(C, dim=2))
            # The T new queries attend to the cached positions too; the causal mask is aligned to the last key, so a
            # single query (a decoding step) sees every key and needs no mask.
            k, v = kv.extend(k, v)
            y = self.attend(q, k, v, causal=T > 1).transpose(1, 2).reshape(B, T, C)
        return self.dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.gelu_mlp = kernels.OPS["gelu_mlp"].implementations[config.mlp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.gelu_mlp(x, self.c_fc.weight, self.c_fc.bias, self.c_proj.weight, self.c_proj.bias,
                          approximate="tanh")
        return self.dropout(y)


class Block(nn.Module):
    """The pre-LayerNorm GPT-2 block: x = x + attn(ln_1(x)), then x = x + mlp(ln_2(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = AddLayerNorm(config.n_embd, config.bias, config.layernorm)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = AddLayerNorm(config.n_embd, config.bias, config.layernorm)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, update: torch.Tensor | None, kv: LayerKV | None = None):
        # Each residual add is left to the LayerNorm after it, which adds and normalises in one pass: ln_1 adds the
        # previous block's MLP output (update), and this block's goes on to the next block's ln_1 (or to ln_f).
        h, x = self.ln_1(x, update)
        h, x = self.ln_2(x, self.attn(h, kv))
        return x, self.mlp(h)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=AddLayerNorm(config.n_embd, config.bias, config.layernorm),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings, as GPT-2
        self.linear_cross_entropy = kernels.OPS["linear_cross_entropy"].implementations[config.loss]

        # GPT-2 initialisation: N(0, 0.02) everywhere, and the projections that write into the residual stream
        # scaled by 1/sqrt(2 * n_layer) so the stream's variance does not grow with depth.
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The final LayerNorm's output (B, T, n_embd) for token ids idx (B, T): what the LM head reads. With a cache,
        idx continues the cache.length tokens it holds: they sit at the positions after them, attend to the cached
        keys and values, and add their own to the cache."""
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > self.config.block_size:
            if cache is None:
                raise ValueError(f"sequence of length {T} is longer than the model's block_size "
                                 f"{self.config.block_size}; crop it to the last {self.config.block_size} tokens")
            raise ValueError(f"{T} tokens after the {start} in the cache pass the model's block_size "
                             f"{self.config.block_size}; clear the cache and pass the last tokens again")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        update = None
        layers = [None] * len(self.transformer.h) if cache is None else cache.layers
        for block, kv in zip(self.transformer.h, layers):
            x, update = block(x, update, kv)
        h, _ = self.transformer.ln_f(x, update)
        return h

    def new_cache(self, batch_size: int) -> KVCache:
        """An empty KVCache for batch_size sequences, in the dtype of the keys it will hold: the autocast dtype where
        autocast is on (so call this inside the autocast region the model runs in), else the weights' dtype."""
        c = self.config
        device = self.lm_head.weight.device
        if torch.is_autocast_enabled(device.type):
            dtype = torch.get_autocast_dtype(device.type)
        else:
            dtype = self.lm_head.weight.dtype
        shape = (batch_size, c.n_head, c.block_size, c.head_dim)
        return KVCache([LayerKV(torch.empty(shape, dtype=dtype, device=device),
                                torch.empty(shape, dtype=dtype, device=device)) for _ in range(c.n_layer)])

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, return_logits: bool | None = None):
        """(logits, loss) for token ids idx (B, T).

        logits: (B, T, vocab), or None when return_logits is false. loss: the mean cross-entropy against targets
        (B, T) (target -1 is ignored), or None without targets. return_logits defaults to `targets is None`: a
        training or evaluation step gets the loss alone, which the "triton" loss computes without ever forming the
        logits; asking for both costs a second LM-head matmul."""
        h = self.hidden_states(idx)
        if return_logits is None:
            return_logits = targets is None
        logits = self.lm_head(h) if return_logits else None
        loss = None if targets is None else self.linear_cross_entropy(h, self.lm_head.weight, targets, ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; the position embedding is left out by default (the token embedding counts once, as
        the tied LM head, whose FLOPs are real)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward and backward): 6N for the matmuls with the weights plus 12·L·H·Q·T for
        attention's two T×T matmuls (the PaLM paper's appendix B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size

    @torch.no_grad()
    def column_major_(self) -> "GPT":
        """Store the Linear layers' weights (the tied LM head included) in column-major order, in place: the same
        values, in the order a CPU's BLAS (MKL) multiplies one or a few rows by fastest, as each step of text
        generation does. A row times an (out, in) weight stored row by row runs as one dot product per output, well
        below the memory bandwidth; stored column by column, the weight is streamed. For generation on a CPU
        (sample.py); training keeps nn.Linear's order."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                module.weight.data = module.weight.data.t().contiguous().t()
        return self

    @torch.no_grad()
    def generate_tokens(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None,
                        generator: torch.Generator | None = None, use_cache: bool = True):
        """Yield (B,) tensors of new tokens, one position at a time, continuing idx (B, T). temperature 0 picks the
        most likely token.

        With use_cache (the default) a first pass over the context fills a KVCache, and each new token then runs
        through the model alone. Without it every token reads its whole context again: the same tokens while the
        sequence fits in block_size, at a cost that grows with the context.

        The learned positions stop at block_size, so a longer sequence is predicted from its last tokens only.
        Without the cache, each token sees the last block_size tokens. With it, once the cache is full it is refilled
        from the last half of block_size (rounded up), in one pass, and decoding goes on from there: a token past
        block_size sees between that half and block_size tokens, and a refill comes once every half block_size
        tokens. A context longer than block_size is cropped to its last block_size tokens either way."""
        block_size = self.config.block_size
        refill = (block_size + 1) // 2
        cache = self.new_cache(idx.shape[0]) if use_cache else None
        weight_casts = kernels.WeightCasts()  # under autocast, each weight is cast once for the whole call
        for _ in range(max_new_tokens):
            if cache is None or cache.length == 0:
                context = idx[:, -block_size:]
            elif cache.length < block_size:
                context = idx[:, -1:]  # the newest token: the cache holds those before it
            else:
                cache.clear()
                context = idx[:, -refill:]
            with weight_casts:
                logits = self.lm_head(self.hidden_states(context, cache)[:, -1, :])  # the last position's alone
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
            idx = torch.cat([idx, next_token[:, None]], dim=1)
            yield next_token

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """idx (B, T) followed by max_new_tokens sampled tokens (generate_tokens says how, and takes the same
        keywords)."""
        new = list(self.generate_tokens(idx, max_new_tokens, **sampling))
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx


def parameter_count(config: GPTConfig) -> int:
    """GPT(config)'s parameter count, the position embedding included, from the shape alone (without building it)."""
    C = config.n_embd
    # Per layer: the four matmuls' 3C² + C² + 4C² + 4C² weights, two LayerNorm gains and, with biases, the
    # matmuls' 3C + C + 4C + C and the LayerNorms' 2C.
    layer = 12 * C * C + 2 * C + (11 * C if config.bias else 0)
    final_norm = 2 * C if config.bias else C
    return (config.vocab_size + config.block_size) * C + config.n_layer * layer + final_norm


def training_memory(config: GPTConfig, batch_size: int, compute_bytes: int) -> dict[str, int]:
    """A lower bound on the memory (bytes) a process needs to train the model on micro-batches of batch_size
    sequences, by what needs it; compute_bytes is the size of an element in the dtype it computes in. Only what
    must exist at the peak of a step is counted, so a shape over the bound surely cannot train: fp32 weights with
    their gradients and AdamW's two moments; the input of each layer's four matmuls, which their backward needs for
    the weight gradients (C + C + C + 4C per token); with the "torch" attention, its T x T probabilities; with the
    "torch" loss, the logits."""
    tokens = batch_size * config.block_size
    need = {"weights, gradients and AdamW state": 16 * parameter_count(config),
            "activations": compute_bytes * tokens * 7 * config.n_embd * config.n_layer}
    if config.attention == "torch":
        need["attention scores"] = (compute_bytes * batch_size * config.n_head * config.block_size ** 2
                                    * config.n_layer)
    if config.loss == "torch":
        need["logits"] = compute_bytes * tokens * config.vocab_size
    return need


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                      generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits (B, vocab): greedy at temperature 0, else sampled from the softmax at that
    temperature, restricted to the top_k most likely (exactly k: ties at the k-th are broken by torch.topk) and to the
    smallest set whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # The draw runs over the candidates alone, in descending order, and maps back to their token ids: with top_k that
    # is k values rather than the whole vocabulary (dividing by a temperature > 0 keeps the order).
    ids = None
    if top_k is not None and top_k < logits.size(-1):
        logits, ids = torch.topk(logits, top_k, dim=-1)
    elif top_p is not None and top_p < 1.0:
        logits, ids = torch.sort(logits, dim=-1, descending=True)
    probs = (logits.float() / temperature).softmax(dim=-1)
    if top_p is not None and top_p < 1.0:
        # Drop a token when the tokens more likely than it already reach top_p; the most likely always stays.
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, 0.0)
    choice = torch.multinomial(probs, num_samples=1, generator=generator)
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)
