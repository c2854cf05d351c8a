"""Input validation shared by the Triton ops: each op refuses what it cannot compute exactly."""
import os

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_tensors(op: str, **tensors: torch.Tensor) -> None:
    """Refuse tensors a Triton kernel cannot take: wrong dtype, mixed dtypes or devices, or a device
    Triton cannot run on (the CPU, unless the interpreter is on)."""
    first_name, first = next(iter(tensors.items()))
    for name, t in tensors.items():
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
