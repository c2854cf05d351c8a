"""Compile every Triton kernel for an H100 (sm_90) and an A100 (sm_80) without a GPU, in every configuration its
launcher and autotuner may pick there, and report what ptxas reports: registers, spilled bytes, shared memory.

    python -m bench.gpu_compile [--fast] [--target 90|80|all] [--jobs N]

Exits non-zero when a configuration fails to compile, spills registers or needs more shared memory than the target
has. --fast checks GPT-2 small's shapes in bf16 (a few dozen compiles); the full sweep covers every head_dim, dtype,
width and option below.

How: each op's launcher runs on stand-in CPU tensors of the real shapes with its kernels' launches intercepted, so the
arguments, grid-independent launch parameters and configurations are the launcher's own (the launchers that choose a
configuration by device take on_gpu). Each intercepted launch is expanded through its kernel's autotuner (its
configurations, pruned by its own early_config_prune) and heuristics, then bound the way the JIT binds a launch
(stride-1 and divisible-by-16 specialisation) and compiled with triton.compile for the target. The binding uses
Triton's private JIT API, hence the pinned version range.
"""
import argparse
import contextlib
import importlib
import io
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

# The kernels pick their configurations when defined: they must be defined for a GPU, not the interpreter.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the JIT's default; unset, triton 3.9 warns at each compile

import torch  # noqa: E402
import triton  # noqa: E402

SUPPORTED_TRITON = ((3, 6), (3, 9))  # where the JIT's private binder (create_function_from_signature, _pack_args) fits
TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])
if not SUPPORTED_TRITON[0] <= TRITON_VERSION <= SUPPORTED_TRITON[1]:
    sys.exit(f"error: bench.gpu_compile supports triton 3.6 to 3.9, found {triton.__version__}")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner, Heuristics  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

# By module: tritongpt.kernels binds some module names (linear_cross_entropy) to the op functions they define.
attention, layernorm, linear_cross_entropy, mlp = (
    importlib.import_module(f"tritongpt.kernels.{name}")
    for name in ("attention", "layernorm", "linear_cross_entropy", "mlp"))

SHARED_MEMORY_LIMIT = {90: 232_448, 80: 166_912}  # bytes per block: H100, A100
TARGET_NAMES = {90: "sm_90 (H100)", 80: "sm_80 (A100)"}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# GPT-2 small: 12 heads of 64, width 768, MLP hidden 3072, vocabulary 50257; 8192 tokens a step.
TOKENS, WIDTH, HIDDEN, VOCAB, HEAD_DIM, SEQ_LEN = 8192, 768, 3072, 50257, 64, 1024


@dataclass(frozen=True)
class Compile:
    """One kernel in one configuration: what the JIT would compile for a launch."""
    kernel: str
    config: str
    fn: JITFunction
    args: tuple
    kwargs: dict


@dataclass(frozen=True)
class Result:
    kernel: str
    config: str
    capability: int
    registers: int | None = None
    spill_bytes: int | None = None
    shared_bytes: int | None = None
    error: str | None = None

    @property
    def problem(self) -> str | None:
        """What is wrong with this configuration on its target, or None."""
        if self.error:
            return "failed: " + self.error
        problems = []
        if self.spill_bytes:
            problems.append(f"spills {self.spill_bytes} B")
        if self.shared_bytes > SHARED_MEMORY_LIMIT[self.capability]:
            problems.append(f"needs {self.shared_bytes} B shared > {SHARED_MEMORY_LIMIT[self.capability]}")
        return ", ".join(problems) or None


# ---------------------------------------------------------------------------------------------------------------
# Capturing the launches a launcher makes, and expanding them into compiles.
# ---------------------------------------------------------------------------------------------------------------
KERNELS = {name: getattr(module, name) for module, names in (
    (attention, ("_attn_fwd", "_attn_bwd_delta", "_attn_bwd_dkdv", "_attn_bwd_dq")),
    (layernorm, ("_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel")),
    (mlp, ("_matmul_kernel",)),
    (linear_cross_entropy,
     ("_forward_kernel", "_forward_merge_kernel", "_softmax_grad_kernel", "_grad_matmul_kernel")),
) for name in names}


@contextlib.contextmanager
def intercepted():
    """Within, launching any of KERNELS records (kernel name, args, kwargs) in the yielded list and runs nothing."""
    launches = []
    for name, kernel in KERNELS.items():
        kernel.run = lambda *args, grid, warmup, _name=name, **kwargs: launches.append((_name, args, kwargs))
    try:
        yield launches
    finally:
        for kernel in KERNELS.values():
            del kernel.run


def expand(kernel, args: tuple, kwargs: dict) -> list[tuple[JITFunction, dict]]:
    """The (JITFunction, keyword arguments) pairs a launch of kernel may run: one per configuration its autotuner
    keeps after pruning, with its heuristics applied, as Autotuner.run and Heuristics.run would."""
    if isinstance(kernel, Autotuner):
        kernel.nargs = dict(zip(kernel.arg_names, args))
        try:
            configs = kernel.prune_configs(kwargs)
        finally:
            kernel.nargs = None
        return [pair for config in configs for pair in expand(kernel.fn, args, {**kwargs, **config.all_kwargs()})]
    if isinstance(kernel, Heuristics):
        named = {**dict(zip(kernel.arg_names, args)), **kwargs}
        return expand(kernel.fn, args, {**kwargs, **{name: rule(named) for name, rule in kernel.values.items()}})
    return [(kernel, kwargs)]


def describe(kwargs: dict) -> str:
    """A configuration in brief: the epilogue and flags switched on (constexprs), then the tile (BLOCK_* and GROUP_*
    constexprs), warps and stages."""
    flags = [f"{k}={v}" if k == "EPILOGUE" else k for k, v in kwargs.items()
             if k.isupper() and (v is True or k == "EPILOGUE") and k not in ("EVEN_K", "SINGLE_BLOCK")]
    tiles = [f"{k[6:] if k.startswith('BLOCK_') else k}={v}" for k, v in kwargs.items()
             if k.startswith(("BLOCK_", "GROUP_")) and k != "BLOCK_D"]
    return " ".join(flags + tiles + [f"w{kwargs.get('num_warps', 4)}", f"s{kwargs.get('num_stages', 3)}"])


def compiles(label: str, run) -> list[Compile]:
    """Every compile that run() (a launcher on stand-in tensors) would cause on a GPU, labelled by label."""
    with intercepted() as launches:
        run()
    return [Compile(name, f"{label} | {describe(kw)}", fn, args, kw)
            for name, args, kwargs in launches for fn, kw in expand(KERNELS[name], args, kwargs)]


# ---------------------------------------------------------------------------------------------------------------
# The ops' launchers at the shapes checked. Tensors are never written (the launches are intercepted), so
# torch.empty's untouched pages cost no memory.
# ---------------------------------------------------------------------------------------------------------------
def attention_compiles(head_dim: int, dtype_name: str, causal: bool) -> list[Compile]:
    q, k, v, o, do = (torch.empty(1, 1, SEQ_LEN, head_dim, dtype=DTYPES[dtype_name]) for _ in range(5))
    lse = torch.empty(1, 1, SEQ_LEN)
    scale = head_dim ** -0.5
    label = f"{dtype_name} hd{head_dim}{' causal' if causal else ''}"
    return (compiles(label, lambda: attention._flash_attention_forward(q, k, v, causal, scale))
            + compiles(label, lambda: attention._flash_attention_backward(q, k, v, o, lse, do, causal, scale)))


def layer_norm_compiles(width: int, dtype_name: str, residual: bool, bias: bool) -> list[Compile]:
    dtype = DTYPES[dtype_name]
    x, r, y, s, dy = (torch.empty(TOKENS, width, dtype=dtype) for _ in range(5))
    w, b = torch.empty(width, dtype=dtype), (torch.empty(width, dtype=dtype) if bias else None)
    mean, rstd = torch.empty(TOKENS), torch.empty(TOKENS)
    label = f"{dtype_name} N={width}{' +residual' if residual else ''}{' +bias' if bias else ''}"
    return (compiles(label, lambda: layernorm._normalize(x, r if residual else None, w, b, 1e-5, y,
                                                         s if residual else None, mean, rstd, on_gpu=True))
            + compiles(label, lambda: layernorm._run_backward(dy, dy if residual else None, s, w, mean, rstd,
                                                              on_gpu=True)))


def mlp_compiles(dtype_name: str, approximate: str, options: mlp.MLPOptions) -> list[Compile]:
    """The MLP's training step (forward and backward through its autograd) and its inference forward."""
    dtype = DTYPES[dtype_name]

    def leaf(*shape):
        return torch.empty(*shape, dtype=dtype).requires_grad_()

    x, w1, b1, w2, b2 = leaf(TOKENS, WIDTH), leaf(HIDDEN, WIDTH), leaf(HIDDEN), leaf(WIDTH, HIDDEN), leaf(WIDTH)
    tanh = approximate == "tanh"

    def train_step():
        y, _, _ = mlp._gelu_mlp_forward(x, w1, b1, w2, b2, tanh, options.plain_matmul)
        y.backward(torch.empty_like(y))

    def inference():
        with torch.no_grad():
            mlp._gelu_mlp_inference(x, w1, b1, w2, b2, tanh, options.plain_matmul)

    def unwritten_unless_triton(a, b, bias, plain_matmul):
        # cuBLAS's matmuls (plain_matmul "torch") are not compiled here; running them on the CPU would take a minute.
        return mlp_mm(a, b, bias, plain_matmul) if plain_matmul == "triton" else a.new_empty(a.shape[0], b.shape[1])

    label = (f"{dtype_name} {approximate} M={TOKENS} D={WIDTH} H={HIDDEN}"
             f"{' triton-matmuls' if options.plain_matmul == 'triton' else ''}")
    mlp_mm, mlp._mm = mlp._mm, unwritten_unless_triton
    try:
        return compiles(label, train_step) + compiles(label + " inference", inference)
    finally:
        mlp._mm = mlp_mm


def linear_cross_entropy_compiles(dtype_name: str) -> list[Compile]:
    dtype = DTYPES[dtype_name]
    x, w = torch.empty(TOKENS, WIDTH, dtype=dtype), torch.empty(VOCAB, WIDTH, dtype=dtype)
    targets = torch.zeros(TOKENS, dtype=torch.int64)
    stats = torch.empty(TOKENS)
    label = f"{dtype_name} N={TOKENS} D={WIDTH} V={VOCAB}"
    return (compiles(label, lambda: linear_cross_entropy._run_forward(x, w, targets, -1, dtype, on_gpu=True))
            + compiles(label, lambda: linear_cross_entropy._run_backward(
                torch.ones(()), x, w, targets, stats, stats, torch.tensor(TOKENS), -1, True, True, on_gpu=True)))


def all_compiles(fast: bool) -> list[Compile]:
    """The sweep: GPT-2 small's shapes in bf16 when fast, else every case below."""
    if fast:
        cases = [attention_compiles(HEAD_DIM, "bf16", True),
                 layer_norm_compiles(WIDTH, "bf16", True, True), layer_norm_compiles(WIDTH, "bf16", False, True),
                 mlp_compiles("bf16", "tanh", mlp.MLPOptions()), linear_cross_entropy_compiles("bf16")]
    else:
        cases = ([attention_compiles(d, t, c) for d in (32, 64, 128, 256) for t in DTYPES for c in (True, False)]
                 + [layer_norm_compiles(n, t, r, b) for n in (768, 1024, 4096, 8192, 65536) for t in DTYPES
                    for r in (True, False) for b in (True, False)]
                 + [mlp_compiles(t, a, mlp.MLPOptions(plain_matmul=p)) for t in DTYPES for a in ("tanh", "none")
                    for p in ("torch", "triton")]
                 + [linear_cross_entropy_compiles(t) for t in DTYPES])
    return dedupe([c for case in cases for c in case])


def dedupe(compiles_: list[Compile]) -> list[Compile]:
    """Drop compiles identical to an earlier one (same kernel, specialisation and constexprs): several cases launch
    the same binary (the backward's delta kernel ignores causality, say)."""
    seen, kept = set(), []
    for c in compiles_:
        options, signature, constexprs, attrs = _bind(c, GPUTarget("cuda", 90, 32))
        key = (c.kernel, repr(options), repr(signature), repr(constexprs), repr(attrs))
        if key not in seen:
            seen.add(key)
            kept.append(c)
    return kept


# ---------------------------------------------------------------------------------------------------------------
# Compiling for a target and reading ptxas's report.
# ---------------------------------------------------------------------------------------------------------------
def _bind(c: Compile, target: GPUTarget):
    """(options, signature, constexprs, attrs) as JITFunction.run computes them for this launch."""
    backend = make_backend(target)
    binder = create_function_from_signature(c.fn.signature, c.fn.params, backend)
    kwargs = {"debug": False, **c.kwargs}
    bound_args, specialization, options = binder(*c.args, **kwargs)
    return c.fn._pack_args(backend, kwargs, bound_args, specialization, options)


def compile_for(c: Compile, capability: int) -> Result:
    target = GPUTarget("cuda", capability, 32)
    log = io.StringIO()
    try:
        options, signature, constexprs, attrs = _bind(c, target)
        with contextlib.redirect_stdout(log):  # ptxas's -v report, printed by the compiler
            compiled = triton.compile(ASTSource(c.fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as e:  # noqa: BLE001 -- any failure to compile is a finding, reported in one line
        return Result(c.kernel, c.config, capability, error=str(e).strip().splitlines()[0][:200])
    text = log.getvalue()
    registers = re.search(r"Used (\d+) registers", text)
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    if registers is None:
        return Result(c.kernel, c.config, capability, error="no ptxas report (is ptxas available?)")
    return Result(c.kernel, c.config, capability, int(registers.group(1)), max(spills, default=0),
                  compiled.metadata.shared)


def configure_compiler(cache_dir: str) -> None:
    """Set up this process for compile_for: compile always (into cache_dir) and print ptxas's report."""
    triton.knobs.cache.dir = cache_dir
    triton.knobs.compilation.always_compile = True  # a cached binary would come without ptxas's report
    triton.knobs.nvidia.dump_ptxas_log = True


def _compile_job(job: tuple[int, int]) -> Result:
    index, capability = job
    return compile_for(_JOBS[index], capability)


_JOBS: list[Compile] = []  # what the workers compile, by index: they inherit it (forked), so a job is two ints


def run(fast: bool, capabilities: list[int], jobs: int) -> list[Result]:
    _JOBS[:] = all_compiles(fast)
    work = [(i, cap) for cap in capabilities for i in range(len(_JOBS))]
    with tempfile.TemporaryDirectory() as cache_dir:
        if jobs == 1:
            configure_compiler(cache_dir)
            return [_compile_job(job) for job in work]
        with ProcessPoolExecutor(jobs, initializer=configure_compiler, initargs=(cache_dir,)) as pool:
            return list(pool.map(_compile_job, work))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fast", action="store_true", help="GPT-2 small's shapes in bf16 only")
    parser.add_argument("--target", choices=("90", "80", "all"), default="all")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles in parallel")
    args = parser.parse_args(argv)
    capabilities = [90, 80] if args.target == "all" else [int(args.target)]
    results = run(args.fast, capabilities, args.jobs)
    width = max(len(r.kernel) for r in results), max(len(r.config) for r in results)
    print(f"{'kernel':<{width[0]}}  {'config':<{width[1]}}  target  regs  spill  shared")
    for r in results:
        numbers = (f"{r.registers:>4}  {r.spill_bytes:>5}  {r.shared_bytes:>6}" if r.error is None else "")
        flag = f"  <- {r.problem}" if r.problem else ""
        print(f"{r.kernel:<{width[0]}}  {r.config:<{width[1]}}  sm_{r.capability}   {numbers}{flag}")
    problems = [r for r in results if r.problem]
    targets = ", ".join(TARGET_NAMES[c] for c in capabilities)
    print(f"\n{len(results)} compiles (triton {triton.__version__}, {targets}): {len(problems)} with a problem")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
