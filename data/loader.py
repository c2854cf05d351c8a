"""(x, y) batches of block_size-token windows from the memory-mapped token files written by data/prepare.py.

The order is the same however many processes train. Each epoch cuts the token stream into back-to-back windows at
a random offset and shuffles them (seeded by the run's seed and the epoch); each optimizer step takes the next
`micro_batch * grad_accum` windows of that list, and each rank takes its own slice of them. So no two ranks ever
read the same window in a step, N ranks train on exactly the windows one process would with the same global
batch, and the data position is just (epoch, cursor), which a checkpoint stores to resume exactly.
"""
from pathlib import Path

import numpy as np
import torch

from tritongpt.errors import UserError


class TokenWindows:
    def __init__(self, path: str | Path, dtype: str, block_size: int, micro_batch: int, grad_accum: int = 1,
                 rank: int = 0, world_size: int = 1, seed: int = 0, device: torch.device | str = "cpu"):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"token file {self.path} is missing; run `python data/prepare.py` to build it")
        self.tokens = np.memmap(self.path, dtype=np.dtype(dtype), mode="r")
        if len(self.tokens) < block_size + 1:
            raise UserError(f"{self.path} holds {len(self.tokens)} tokens, fewer than block_size + 1 = "
                            f"{block_size + 1}; use a smaller --block-size or more text")
        if grad_accum % world_size:
            raise UserError(f"--grad-accum {grad_accum} does not divide by the {world_size} processes; "
                            f"make it a multiple of {world_size}")
        self.block_size = block_size
        self.micro_batch = micro_batch
        self.grad_accum = grad_accum
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.device = torch.device(device)
        self.epoch = 0
        self.cursor = 0
        self._order = None

    @property
    def windows_per_step(self) -> int:
        return self.micro_batch * self.grad_accum

    def _epoch_order(self) -> torch.Tensor:
        """Start offsets of this epoch's windows, shuffled."""
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            long_enough = len(self.tokens) > 2 * self.block_size  # a random offset still leaves a whole window
            offset = int(torch.randint(self.block_size, (1,), generator=g)) if long_enough else 0
            n = (len(self.tokens) - 1 - offset) // self.block_size
            self._order = offset + torch.randperm(n, generator=g) * self.block_size
        return self._order

    def next_step(self) -> torch.Tensor:
        """This rank's window starts for the next optimizer step, shape (grad_accum // world_size, micro_batch)."""
        order = self._epoch_order()
        if self.cursor > 0 and self.cursor + self.windows_per_step > len(order):
            self.epoch, self.cursor, self._order = self.epoch + 1, 0, None
            order = self._epoch_order()
        if self.windows_per_step > len(order):  # an epoch shorter than one step: repeat its windows
            order = order.repeat(-(-self.windows_per_step // len(order)))
        step = order[self.cursor:self.cursor + self.windows_per_step]
        self.cursor += self.windows_per_step
        # Global micro-batch g goes to rank g % world_size: rank r's local micro-step m is g = m * world_size + r.
        micro = step.view(self.grad_accum, self.micro_batch)
        return micro[self.rank::self.world_size]

    def fetch(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) token windows starting at `starts`, y shifted by one, on the loader's device."""
        rows = np.stack([self.tokens[s:s + self.block_size + 1] for s in starts.tolist()]).astype(np.int64)
        xy = torch.from_numpy(rows)
        x, y = xy[:, :-1], xy[:, 1:]
        if self.device.type == "cuda":
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.contiguous(), y.contiguous()

    def eval_batches(self, num_batches: int) -> torch.Tensor:
        """This rank's share of the evaluation set: the same num_batches micro-batches at every evaluation (so
        successive losses compare like with like) whatever the number of ranks; batch i goes to rank i % world_size.
        Shape (batches for this rank, micro_batch)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 - 1)
        n = (len(self.tokens) - 1) // self.block_size
        starts = torch.randperm(n, generator=g) * self.block_size
        total = num_batches * self.micro_batch
        starts = starts.repeat(-(-total // n))[:total].view(num_batches, self.micro_batch)
        return starts[self.rank::self.world_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self._order = int(state["epoch"]), int(state["cursor"]), None
