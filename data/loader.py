"""(x, y) batches of block_size-token windows from the memory-mapped token shards written by data/prepare.py.

The order is the same however many processes train. Each epoch cuts every shard into back-to-back windows at a
random offset (the same for all shards) and shuffles the windows of all the shards together (seeded by the run's
seed and the epoch); each optimizer step takes the next `micro_batch * grad_accum` windows of that list, and each
rank takes its own slice of them. So no two ranks ever read the same window in a step, N ranks train on exactly the
windows one process would with the same global batch, and the data position is just (epoch, cursor), which a
checkpoint stores to resume exactly. A window never spans two shards: the tokens at a shard's end too few for a
window (fewer than block_size + 1 past the last start) sit out that epoch, at most block_size + offset of each
shard's 100 M. A dataset of one file without a header (train.bin, val.bin, as earlier versions wrote) is one shard
and gives the same windows it always did.

Each shard is checked against its header and what meta.json records before training starts: its size, and the ids
of a sample spread along it; every batch drawn is checked too, so a damaged file stops a run with one line instead
of an index error (or, on a GPU, a device-side assert).
"""
from pathlib import Path

import numpy as np
import torch

from tritongpt.data import shards
from tritongpt.errors import UserError


# A damaged file is found on opening from this many evenly spaced runs of this many tokens (the whole of a file that
# short): a few MB read however large it is.
CHECKED_RUNS = 64
CHECKED_RUN_TOKENS = 16_384


class TokenWindows:
    def __init__(self, path: str | Path | list[Path], dtype: str, vocab_size: int, num_tokens: int, block_size: int,
                 micro_batch: int, grad_accum: int = 1, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: torch.device | str = "cpu"):
        """path: a split's shards (TokenWindows.split_files lists them), or one token file without a header;
        num_tokens ids in all of the given dtype, each below vocab_size, as meta.json records."""
        paths = [Path(p) for p in path] if isinstance(path, list) else [Path(path)]
        self.vocab_size = vocab_size
        if isinstance(path, list):
            self.shards = open_shards(paths, dtype, vocab_size, num_tokens)
        else:
            self.shards = [(paths[0], open_tokens(paths[0], dtype, vocab_size, num_tokens))]
        lengths = [len(tokens) for _, tokens in self.shards]
        # Where each shard starts in the split's tokens: a window start is a position there.
        self.starts = np.cumsum([0] + lengths[:-1])
        if max(lengths) < block_size + 1:
            where = (f"{paths[0]}" if len(paths) == 1 else
                     f"the longest shard of {paths[0].parent / paths[0].name.rsplit('-', 1)[0]}-*.bin")
            raise UserError(f"{where} holds {max(lengths)} tokens, "
                            f"fewer than block_size + 1 = {block_size + 1}; use a smaller --block-size or more text")
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

    @staticmethod
    def split_files(data_dir: Path, meta: dict, split: str) -> Path | list[Path]:
        """The token files of a split of the dataset meta.json describes: its shards, or the one file of a dataset
        written before shards."""
        if "shards" not in meta:
            return data_dir / f"{split}.bin"
        try:
            files = [data_dir / shard["file"] for shard in meta["shards"][split]]
        except (KeyError, TypeError):
            files = []
        if not files:
            raise UserError(f"{data_dir / 'meta.json'} lists no {split} shards, so it was not written by "
                            f"data/prepare.py; {_rebuild(data_dir / 'meta.json')}")
        return files

    @property
    def windows_per_step(self) -> int:
        return self.micro_batch * self.grad_accum

    def _epoch_order(self) -> torch.Tensor:
        """Start offsets of this epoch's windows, shuffled."""
        if self._order is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            # A random offset that still leaves every shard a whole window.
            long_enough = min(len(tokens) for _, tokens in self.shards) > 2 * self.block_size
            offset = int(torch.randint(self.block_size, (1,), generator=g)) if long_enough else 0
            grid = self._window_starts(offset)
            self._order = grid[torch.randperm(len(grid), generator=g)]
        return self._order

    def _window_starts(self, offset: int) -> torch.Tensor:
        """The starts of back-to-back windows from offset in each shard, as positions in the split."""
        return torch.cat([int(start) + offset + torch.arange(max(0, (len(tokens) - 1 - offset) // self.block_size))
                          * self.block_size for start, (_, tokens) in zip(self.starts, self.shards)])

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
        located = [self._locate(s) for s in starts.tolist()]
        rows = np.stack([tokens[s:s + self.block_size + 1] for _, tokens, s in located]).astype(np.int64)
        if rows.max() >= self.vocab_size:  # where the check on opening did not look
            row, col = np.unravel_index(rows.argmax(), rows.shape)
            path, _, start = located[row]
            raise UserError(_out_of_vocabulary(path, int(rows.max()), start + int(col), self.vocab_size))
        xy = torch.from_numpy(rows)
        x, y = xy[:, :-1], xy[:, 1:]
        if self.device.type == "cuda":
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.contiguous(), y.contiguous()

    def _locate(self, start: int) -> tuple[Path, np.ndarray, int]:
        """(shard file, its tokens, the position in it) of a position in the split."""
        index = int(np.searchsorted(self.starts, start, side="right")) - 1
        path, tokens = self.shards[index]
        return path, tokens, start - int(self.starts[index])

    def eval_batches(self, num_batches: int) -> torch.Tensor:
        """This rank's share of the evaluation set: the same num_batches micro-batches at every evaluation (so
        successive losses compare like with like) whatever the number of ranks; batch i goes to rank i % world_size.
        Shape (batches for this rank, micro_batch)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 - 1)
        grid = self._window_starts(0)
        n = len(grid)
        starts = grid[torch.randperm(n, generator=g)]
        total = num_batches * self.micro_batch
        starts = starts.repeat(-(-total // n))[:total].view(num_batches, self.micro_batch)
        return starts[self.rank::self.world_size]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.cursor, self._order = int(state["epoch"]), int(state["cursor"]), None


def open_shards(paths: list[Path], dtype: str, vocab_size: int, num_tokens: int) -> list[tuple[Path, np.ndarray]]:
    """Each shard with its tokens memory-mapped, once its header agrees with its size and the dtype, together they
    hold num_tokens, and, where checked, the ids are below vocab_size."""
    opened = []
    for path in paths:
        if not path.is_file():
            raise UserError(f"token shard {path} is missing; {_rebuild(path)}")
        found_dtype, count = shards.read_header(path)
        if found_dtype != dtype:
            raise UserError(f"{path} holds {found_dtype} tokens but meta.json records {dtype}: it is from another "
                            f"dataset; {_rebuild(path)}")
        tokens = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r", offset=shards.HEADER_BYTES,
                           shape=(count,)) if count else np.zeros(0, dtype)
        _check_ids(path, tokens, vocab_size)
        opened.append((path, tokens))
    if (total := sum(len(tokens) for _, tokens in opened)) != num_tokens:
        raise UserError(f"the shards {paths[0].name} ... {paths[-1].name} hold {total:,} tokens but meta.json "
                        f"records {num_tokens:,}: one is missing, damaged or was replaced; {_rebuild(paths[0])}")
    return opened


def open_tokens(path: Path, dtype: str, vocab_size: int, num_tokens: int) -> np.memmap:
    """The token file, memory-mapped, once it is known to hold num_tokens ids and, where checked, ids below
    vocab_size."""
    if not path.is_file():
        raise UserError(f"token file {path} is missing; run `python data/prepare.py` to build it")
    itemsize = np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size != num_tokens * itemsize:
        found = ("is empty" if size == 0 else f"holds {size:,} bytes, not a whole number of {dtype} tokens"
                 if size % itemsize else f"holds {size // itemsize:,} tokens")
        raise UserError(f"{path} {found} but meta.json records {num_tokens:,} {dtype} tokens: it is damaged or was "
                        f"replaced; {_rebuild(path)}")
    tokens = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r") if size else np.zeros(0, dtype)
    _check_ids(path, tokens, vocab_size)
    return tokens


def _check_ids(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    for start in _checked_runs(len(tokens)):
        run = tokens[start:start + CHECKED_RUN_TOKENS]
        if (top := int(run.max())) >= vocab_size:
            raise UserError(_out_of_vocabulary(path, top, start + int(run.argmax()), vocab_size))


def _checked_runs(num_tokens: int) -> list[int]:
    """Where the runs of tokens checked on opening start: evenly spaced, the first at 0 and the last at the end."""
    if num_tokens <= CHECKED_RUNS * CHECKED_RUN_TOKENS:
        return list(range(0, num_tokens, CHECKED_RUN_TOKENS))
    return np.linspace(0, num_tokens - CHECKED_RUN_TOKENS, CHECKED_RUNS).astype(np.int64).tolist()


def _out_of_vocabulary(path: Path, token: int, position: int, vocab_size: int) -> str:
    return (f"{path} holds token id {token} at position {position:,}, outside the {vocab_size}-token vocabulary "
            f"meta.json records: it is damaged or from another dataset; {_rebuild(path)}")


def _rebuild(path: Path) -> str:
    return (f"rebuild the dataset with `python data/prepare.py [INPUT ...] --out-dir {path.parent} --overwrite` (its "
            "own inputs; none for the default corpus)")
