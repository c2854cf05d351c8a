"""What the Triton ops share: refusing tensors a kernel cannot take, autotuning that also runs under Triton's CPU
interpreter, registering a kernel's launcher as a PyTorch operator, casting weights under autocast, and a matmul's
main loop. Each op's own shape rules stay in its module, in a function named `_validate`."""
import functools
import os
import sys
from collections.abc import Callable

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_tensors(op: str, **tensors: torch.Tensor | None) -> None:
    """Refuse tensors a Triton kernel cannot take: wrong dtype, mixed dtypes or devices, or a device Triton cannot run
    on (the CPU, unless the interpreter is on). None stands for an optional tensor left out, and is skipped."""
    given = {name: t for name, t in tensors.items() if t is not None}
    first_name, first = next(iter(given.items()))
    for name, t in given.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{op}: {name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
        if t.dtype != first.dtype:
            raise ValueError(f"{op}: {name} is {t.dtype} but {first_name} is {first.dtype}; cast them to one dtype")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} is on {t.device} but {first_name} is on {first.device}; "
                             "move them to one device")
    if first.device.type != "cuda" and not interpreting():
        raise ValueError(f"{op}: the Triton kernel needs CUDA tensors (got {first.device}); use the 'torch' "
                         "implementation on CPU, or set TRITON_INTERPRET=1 to run the kernel in Triton's interpreter")


def autotune(configs: list[triton.Config], key: list[str], interpreter_config: triton.Config,
             prune_configs_by: dict | None = None):
    """triton.autotune over configs, retuned whenever the arguments named in key change (the autotuner adds the
    tensors' dtypes itself). The interpreter cannot autotune: there the kernel runs interpreter_config alone, and there
    is nothing to prune.

    The choice is kept in Triton's cache on disk (cache_results), and a later process on the same machine takes it
    from there instead of timing the configs again: tiles of another shape sum in another order, so a choice made
    afresh, from timings that vary from run to run, could round a resumed run's gradients differently from the
    run it continues."""
    if interpreting():
        return triton.autotune([interpreter_config], key=key)
    return triton.autotune(configs, key=key, prune_configs_by=prune_configs_by, cache_results=True)


def kernel_op(name: str, fake: Callable):
    """Register the decorated function, which launches Triton kernels, as the PyTorch operator tritongpt::name (its
    type annotations are the schema) with `fake` as its fake implementation. `fake` takes the same arguments and
    returns the outputs as empty tensors, made by the same code the function allocates them with (calling `fake`
    itself, or the helpers it calls), so that the shapes, dtypes and strides torch.compile plans with are those the
    kernels write; torch.library.opcheck holds the two to each other.

    torch.library.custom_op, not triton_op: the operator is opaque to torch.compile, which calls it as it stands and
    traces only its fake. So the launcher stays plain Python: the autotuners' config pruning and heuristics, launch
    configurations cached per shape, device queries and Triton's CPU interpreter all work under the compiler as they
    do eagerly. triton_op would show Inductor the kernels, but Inductor fuses nothing into a user's Triton kernel, and
    it would have to trace each launcher: its autotuner, and Triton's interpreter, which cannot be traced. An op's
    autograd is registered on its forward operator (register_autograd with setup_context), and its backward calls
    the op's backward operator, registered the same way."""
    def register(launcher: Callable):
        op = torch.library.custom_op(f"tritongpt::{name}", launcher, mutates_args=())

        @functools.wraps(fake)
        def fake_declaring_fallback(*args, **kwargs):
            _declare_inductor_fallback(op._opoverload)
            return fake(*args, **kwargs)
        op.register_fake(fake_declaring_fallback)
        return op
    return register


def _declare_inductor_fallback(overload: torch._ops.OpOverload) -> None:
    """Declare the operator to Inductor, once Inductor is loaded, as a kernel it calls as it stands, with the strides
    the fake gives: what Inductor would decide itself on meeting the operator, less the log line it writes on the way,
    for which PyTorch 2.11 (not 2.13) renders every argument's whole expression, even with the log off; at GPT-2's
    depth the residual stream's expression takes minutes. The fake runs when Inductor's ahead-of-time autograd traces
    the graph, before the graph is lowered."""
    lowering = sys.modules.get("torch._inductor.lowering")
    if lowering is not None and overload not in lowering.lowerings:
        lowering.make_fallback(overload, layout_constraint=lowering.constrain_to_fx_strides, warn=False)


class WeightCasts:
    """A scope, entered with `with`, in which the ops cast each float32 weight to the autocast dtype once per version
    of its values instead of at every call, while no gradient is recorded. Autocast caches its own casts of
    F.linear's weights for the length of its region; without this, a loop that runs the same weights many times
    (decoding one token at a time) would read and write every weight again at each step. The casts live as long as
    this object; an in-place update of a weight (an optimizer step) bumps its version, so it is cast afresh."""

    def __init__(self):
        self._casts: dict[int, tuple[torch.Tensor, int, torch.dtype, torch.Tensor]] = {}  # by id(weight)

    def __enter__(self) -> "WeightCasts":
        global _weight_casts
        self._outer, _weight_casts = _weight_casts, self
        return self

    def __exit__(self, *exc) -> None:
        global _weight_casts
        _weight_casts = self._outer

    def __len__(self) -> int:
        """How many weights have a cast held here."""
        return len(self._casts)

    def cast(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # The entry holds the weight itself, so that its id cannot pass to another tensor while the entry lives.
        entry = self._casts.get(id(weight))
        if entry is None or entry[1] != weight._version or entry[2] != dtype:
            entry = (weight, weight._version, dtype, weight.to(dtype))
            self._casts[id(weight)] = entry
        return entry[3]


_weight_casts: WeightCasts | None = None  # the innermost WeightCasts entered


def autocast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight in dtype, from the WeightCasts entered when there is one and no gradient is recorded (a cached cast
    has no autograd history, so with gradients on every call casts anew, and the gradient reaches the weight)."""
    if _weight_casts is None or torch.is_grad_enabled() or weight.is_inference():
        return weight.to(dtype)
    return _weight_casts.cast(weight, dtype)


@triton.jit
def _round_to_tf32(x):
    return tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r, r", [x], dtype=tl.float32, is_pure=True,
                                     pack=1)


@triton.jit
def dot_tile(A, B, offs_m, offs_n, stride_am, stride_ak, stride_bk, stride_bn, K, acc,
             BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """A matmul's main loop: acc + A[offs_m, :] @ B[:, offs_n], summed over K in BLOCK_K steps into acc (fp32), for
    A and B with any strides. Every offset in offs_m and offs_n must be valid: callers wrap those past an edge around
    to real rows and columns and never store what they compute, so that only K needs a mask (and none when EVEN_K: K
    is a multiple of BLOCK_K). DOT_FP32 casts the tiles to fp32 first (bf16 under the interpreter); PRECISION is
    tl.dot's input_precision, or "tf32_rounded": fp32 operands rounded to TF32 (to nearest) before TF32 products,
    as cuBLAS rounds them, where the tensor cores alone would truncate (a bias that about doubles the error)."""
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = B + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
    for k in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < K - k, other=0.0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < K - k, other=0.0)
        if DOT_FP32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if PRECISION == "tf32_rounded":
            acc = tl.dot(_round_to_tf32(a), _round_to_tf32(b), acc, input_precision="tf32")
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc
