"""The ahead-of-time GPU compile check (bench/gpu_compile.py): GPT-2 small's kernels compile for an H100 without a GPU,
spill no registers and fit its shared memory, and the check does flag a configuration that overflows or spills.

Each runs in a subprocess: the check compiles the kernels as defined for a GPU, while this test session defines them
for Triton's interpreter (conftest)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ptxas_missing() -> str | None:
    try:
        import triton
        path = triton.knobs.nvidia.ptxas.path
    except Exception as e:  # noqa: BLE001 -- any failure to find it means there is nothing to compile with
        return f"no ptxas to compile with ({e})"
    return None if path and os.path.exists(path) else "no ptxas to compile with"


pytestmark = pytest.mark.skipif(_ptxas_missing() is not None, reason=str(_ptxas_missing()))


def _python(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_gpt2_kernels_compile_for_h100_without_spills_or_overflow():
    result = _python("-m", "bench.gpu_compile", "--fast", "--target", "90", "--jobs", "2")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert ": 0 with a problem" in result.stdout
    kernels = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("_")}
    assert {"_attn_fwd", "_attn_bwd_dq", "_attn_bwd_dkdv", "_layer_norm_fwd_kernel", "_layer_norm_bwd_kernel",
            "_matmul_kernel", "_forward_kernel", "_softmax_grad_kernel", "_grad_matmul_kernel"} <= kernels


# A matmul tile too large for any GPU's shared memory (64 x 512 and 512 x 64 bf16 tiles, 4 stages), and a LayerNorm
# row block held by one warp (256 fp32 values a thread, before the intermediates): the check must report both.
TAMPERED = """
import dataclasses, tempfile
from bench import gpu_compile as g
cache = tempfile.TemporaryDirectory()
g.configure_compiler(cache.name)
fast = g.all_compiles(fast=True)
for kernel, tile in (("_matmul_kernel", dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=512, num_warps=4, num_stages=4)),
                     ("_layer_norm_fwd_kernel", dict(BLOCK_M=8, BLOCK_N=1024, num_warps=1))):
    c = next(c for c in fast if c.kernel == kernel)
    print(g.compile_for(dataclasses.replace(c, kwargs={**c.kwargs, **tile}), 90).problem)
"""


def test_check_flags_shared_memory_overflow_and_spills():
    result = _python("-c", TAMPERED)
    assert result.returncode == 0, result.stderr[-2000:]
    overflow, spill = result.stdout.strip().splitlines()[-2:]
    assert "B shared > 232448" in overflow
    assert spill.startswith("spills ")
