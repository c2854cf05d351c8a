"""Triton kernels for a GPT's hot paths, one module per op, each beside its reference: the plain PyTorch math the
tests hold the kernel to. OPS registers every op's implementations under one name.

Each Triton op runs as PyTorch custom operators, torch.ops.tritongpt.* (its forward, with its autograd, and its
backward; see _common.kernel_op), so torch.compile takes it into its graph.

This package knows nothing of the model: every op takes plain tensors.

A script run from the repository root has the root on sys.path, where this folder is importable by its bare name,
`kernels`, and would hide any installed package of that name (Hugging Face's kernel hub client, which transformers
imports). Imported by that name, it hands over to the installed package; only without one does it load itself.
"""
import importlib.machinery
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tritongpt.kernels._common import WeightCasts
from tritongpt.kernels.attention import (attention_qkvpacked_reference, attention_reference, flash_attention,
                                         flash_attention_qkvpacked, sdpa_attention, sdpa_attention_qkvpacked)
from tritongpt.kernels.layernorm import add_layer_norm, add_layer_norm_reference, layer_norm, layer_norm_reference
from tritongpt.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from tritongpt.kernels.mlp import MLPOptions, gelu_mlp, gelu_mlp_reference


@dataclass(frozen=True)
class Op:
    """One op's implementations, all called alike: the Triton kernel, the reference it is tested against, and
    any named alternative."""
    triton: Callable
    reference: Callable
    alternatives: Mapping[str, Callable] = field(default_factory=dict)

    @property
    def implementations(self) -> dict[str, Callable]:
        """Each implementation by the name a user chooses it by: "torch" is the reference."""
        return {"torch": self.reference, "triton": self.triton, **self.alternatives}


OPS = {
    "attention": Op(triton=flash_attention, reference=attention_reference, alternatives={"sdpa": sdpa_attention}),
    "attention_qkvpacked": Op(triton=flash_attention_qkvpacked, reference=attention_qkvpacked_reference,
                              alternatives={"sdpa": sdpa_attention_qkvpacked}),
    "layer_norm": Op(triton=layer_norm, reference=layer_norm_reference),
    "add_layer_norm": Op(triton=add_layer_norm, reference=add_layer_norm_reference),
    "gelu_mlp": Op(triton=gelu_mlp, reference=gelu_mlp_reference),
    "linear_cross_entropy": Op(triton=linear_cross_entropy, reference=linear_cross_entropy_reference),
}

__all__ = [
    "OPS", "Op", "WeightCasts",
    "flash_attention", "attention_reference", "sdpa_attention",
    "flash_attention_qkvpacked", "attention_qkvpacked_reference", "sdpa_attention_qkvpacked",
    "layer_norm", "layer_norm_reference", "add_layer_norm", "add_layer_norm_reference",
    "gelu_mlp", "gelu_mlp_reference", "MLPOptions",
    "linear_cross_entropy", "linear_cross_entropy_reference",
]


def _import_installed_namesake(name: str):
    """The package `name` as installed elsewhere on sys.path than this repository, imported and put in
    sys.modules in place of this folder; None when there is none."""
    repository = Path(__file__).resolve().parent.parent
    elsewhere = [entry for entry in sys.path if Path(entry or ".").resolve() != repository]
    spec = importlib.machinery.PathFinder.find_spec(name, elsewhere)
    if spec is None:
        return None
    package = importlib.util.module_from_spec(spec)
    sys.modules[name] = package  # before it runs, as an import does: its own modules import it by name
    spec.loader.exec_module(package)
    return package


if __name__ == "kernels":  # imported by the bare name: the import returns what sys.modules holds once this ends
    _import_installed_namesake(__name__)
