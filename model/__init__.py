"""The GPT-2 model; each op runs on its PyTorch reference, its Triton kernel or a named alternative, as its config
says."""
from tritongpt.model.config import GPTConfig, PRESETS, preset
from tritongpt.model.gpt import GPT, parameter_count, training_memory
from tritongpt.model.gpt2_import import gpt2_config, load_gpt2

__all__ = ["GPT", "GPTConfig", "PRESETS", "preset", "gpt2_config", "load_gpt2", "parameter_count", "training_memory"]
