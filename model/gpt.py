"""A GPT-2 language model, readable top to bottom.

Each op (attention, LayerNorm, MLP, and the LM head with its cross-entropy loss) runs on the implementation the
config names from kernels.OPS: "torch", the plain PyTorch reference in `kernels/`, "triton", the Triton kernel beside
it, or a named alternative ("sdpa": PyTorch's fused attention). All compute the same function; the parity tests hold
them to the reference.
"""
import math

import torch
import torch.nn as nn

from tritongpt import kernels
from tritongpt.model.config import GPTConfig


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
        self.attend = kernels.OPS["attention"].implementations[config.attention]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # Views into the fused projection, (B, n_head, T, head_dim): the attention takes strided inputs.
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        y = self.attend(q, k, v, causal=True)
        y = y.transpose(1, 2).reshape(B, T, C)
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

    def forward(self, x: torch.Tensor, update: torch.Tensor | None):
        # Each residual add is left to the LayerNorm after it, which adds and normalises in one pass: ln_1 adds the
        # previous block's MLP output (update), and this block's goes on to the next block's ln_1 (or to ln_f).
        h, x = self.ln_1(x, update)
        h, x = self.ln_2(x, self.attn(h))
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

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """The final LayerNorm's output (B, T, n_embd) for token ids idx (B, T): what the LM head reads."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than the model's block_size "
                             f"{self.config.block_size}; crop it to the last {self.config.block_size} tokens")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        update = None
        for block in self.transformer.h:
            x, update = block(x, update)
        h, _ = self.transformer.ln_f(x, update)
        return h

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

    def configure_optimizers(self, weight_decay: float, learning_rate: float, betas: tuple[float, float],
                             device_type: str) -> torch.optim.AdamW:
        """AdamW with weight decay on the matrices (every 2-D weight, embeddings included) and none on biases and
        LayerNorm gains; the fused CUDA implementation on GPU."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=device_type == "cuda")

    def flops_per_token(self) -> int:
        """Training FLOPs per token (forward and backward): 6N for the matmuls with the weights plus 12·L·H·Q·T for
        attention's two T×T matmuls (the PaLM paper's appendix B)."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size

    @torch.no_grad()
    def generate_tokens(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                        top_k: int | None = None, top_p: float | None = None,
                        generator: torch.Generator | None = None):
        """Yield (B,) tensors of new tokens, one position at a time, continuing idx (B, T). The context is cropped
        to the last block_size tokens. temperature 0 picks the most likely token."""
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size:]
            logits = self.lm_head(self.hidden_states(context)[:, -1, :])  # the last position's alone
            next_token = sample_next_token(logits.float(), temperature, top_k, top_p, generator)
            idx = torch.cat([idx, next_token[:, None]], dim=1)
            yield next_token

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """idx (B, T) followed by max_new_tokens sampled tokens."""
        new = list(self.generate_tokens(idx, max_new_tokens, **sampling))
        return torch.cat([idx, torch.stack(new, dim=1)], dim=1) if new else idx


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                      generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits (B, vocab): greedy at temperature 0, else sampled from the softmax at that
    temperature, restricted to the top_k most likely and to the smallest set whose probability reaches top_p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens more likely than it already reach top_p; the most likely always stays.
        drop = probs.cumsum(dim=-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)
