"""The model's configuration: its shape, and which implementation each op runs on ("torch", "triton", ...)."""
from dataclasses import dataclass, field, fields

from tritongpt import kernels


def op_choice(*ops: str):
    """A config field naming the implementation that these ops of kernels.OPS run on: "torch" (their references, the
    default), "triton", or an alternative they all have."""
    return field(default="torch", metadata={"ops": ops})


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50257
    block_size: int = 1024   # the longest context the position embedding covers
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0     # on the embeddings and on each sub-layer's output before the residual add
    bias: bool = True        # biases in the Linear layers and LayerNorms, as GPT-2
    attention: str = op_choice("attention", "attention_qkvpacked")
    layernorm: str = op_choice("layer_norm", "add_layer_norm")
    mlp: str = op_choice("gelu_mlp")
    loss: str = op_choice("linear_cross_entropy")  # the LM head and the cross-entropy after it

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            divisors = [h for h in range(1, self.n_embd + 1) if self.n_embd % h == 0][:12]
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                             f"choose n_head among {divisors}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        for op in OP_FIELDS:
            if getattr(self, op) not in implementations(op):
                raise ValueError(f"{op} must be one of {implementations(op)}, got {getattr(self, op)!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# The config's op fields, each with the ops of kernels.OPS whose implementation it names.
OP_FIELDS = {f.name: f.metadata["ops"] for f in fields(GPTConfig) if "ops" in f.metadata}


def implementations(op: str) -> tuple[str, ...]:
    """The implementations an op field can name: those that every op of kernels.OPS it covers has."""
    each = [kernels.OPS[kernel_op].implementations for kernel_op in OP_FIELDS[op]]
    return tuple(name for name in each[0] if all(name in names for names in each))


# Shapes only: vocab_size comes from the tokenizer, the ops from the run's options.
PRESETS = {
    # The four GPT-2 sizes (parameter counts with the 50257-token vocabulary).
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024),          # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024, block_size=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280, block_size=1024),   # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600, block_size=1024),      # 1558M
    # Small ones that train in minutes: "mini" on a CPU, "small" on a GPU.
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64),
    "mini": dict(n_layer=4, n_head=4, n_embd=128, block_size=128),
    "small": dict(n_layer=6, n_head=6, n_embd=384, block_size=256),
}


def preset(name: str, **overrides) -> GPTConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})
