"""Where and how the model runs: the device, each op's implementation, the compute dtype, and its memory."""
import os
import re
from pathlib import Path

import torch

from tritongpt.kernels._common import interpreting
from tritongpt.model.config import OP_FIELDS, implementations
from tritongpt.errors import UserError


def resolve_device(option: str) -> torch.device:
    if option == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(option)
    except RuntimeError:
        raise UserError(f"--device {option!r} is not a device; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {option}: no CUDA GPU is visible; use --device cpu")
    return device


def impl_choices(op: str) -> tuple[str, ...]:
    """What the op's flag (--attention, --layernorm, ...) takes: auto, or one of the op's implementations."""
    return ("auto", *implementations(op))


def resolve_ops(options, device: torch.device) -> dict[str, str]:
    """{op: implementation} for the model config's op fields, from the options' choices of the same names; an op a
    script offers no choice for (sample.py computes no loss) is auto."""
    return {op: resolve_impl(op, getattr(options, op, "auto"), device) for op in OP_FIELDS}


def resolve_impl(op: str, choice: str, device: torch.device) -> str:
    """auto means the Triton kernel on CUDA and the reference ("torch") on CPU."""
    if choice == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if choice not in implementations(op):
        raise UserError(f"--{op} {choice}: {op} has no such implementation; use one of auto, "
                        f"{', '.join(implementations(op))}")
    if choice == "triton" and device.type != "cuda" and not interpreting():
        raise UserError(f"--{op} triton needs a CUDA GPU; use --{op} torch on CPU "
                        "(or TRITON_INTERPRET=1 to run the kernels, slowly, in Triton's interpreter)")
    return choice


def compute_dtype(choice: str, device: torch.device) -> torch.dtype:
    """auto is bfloat16 on CUDA where supported, else float16; the CPU computes in float32."""
    if device.type != "cuda":
        if choice not in ("auto", "float32"):
            raise UserError(f"--dtype {choice} needs a CUDA GPU; on CPU the model runs in float32 (--dtype float32)")
        return torch.float32
    if choice == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, choice)


def autocast(dtype: torch.dtype, device: torch.device):
    """Mixed precision at dtype (a no-op context for float32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def memory_available(device: torch.device) -> int:
    """The most memory (bytes) a process on device can hope for: a GPU's total memory; on a CPU the memory free for
    use now, RAM and swap (Linux's MemAvailable + SwapFree; elsewhere the physical RAM)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        return sum(int(meminfo[key].split()[0]) for key in ("MemAvailable", "SwapFree")) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:,.1f} GiB"


def out_of_memory(error: BaseException) -> str | None:
    """For an allocation failure, what it failed to allocate ("20.00 GiB", or "" when the error does not say);
    None for any other error."""
    text = str(error)
    if not (isinstance(error, torch.OutOfMemoryError) or isinstance(error, RuntimeError) and (
            "out of memory" in text or "can't allocate memory" in text)):
        return None
    if found := re.search(r"Tried to allocate ([\d.]+ [KMGT]?i?B)", text):  # the CUDA allocator's words
        return found[1]
    if found := re.search(r"tried to allocate (\d+) bytes", text):  # the CPU allocator's
        return gib(int(found[1]))
    return ""
