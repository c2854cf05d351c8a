"""The learning-rate schedule: linear warm-up, then cosine decay to a floor."""
import math


def learning_rate(step: int, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """The rate for optimizer step `step` (0-based): rises linearly over warmup_steps, then follows a half cosine
    from max_lr down to min_lr at decay_steps, and stays at min_lr after."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
