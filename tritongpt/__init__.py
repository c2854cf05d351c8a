"""tritongpt: a GPT-2 trainer whose hot paths are Triton kernels.

The one package this project installs. Its subpackages live in folders of their own at the repository's top level
(pyproject.toml maps them): tritongpt.kernels is kernels/, tritongpt.model is model/, tritongpt.data is data/.
The modules here are what train.py and sample.py run on: options, devices, the training step, checkpoints,
metrics, DDP. Two of them are leaves that any layer may import, since they import nothing of the project:
errors (the one exception a user's mistake raises) and options (command-line options from a dataclass).
"""
