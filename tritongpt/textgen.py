"""Text from a model, printed as it is generated (shared by sample.py and train.py's closing sample)."""
import sys
from typing import TextIO

import torch


def prompt_ids(tokenizer, prompt: str, block_size: int) -> list[int]:
    """The prompt's tokens after an end-of-document token (so an empty prompt starts a fresh document), keeping
    the last block_size tokens of a longer prompt."""
    return ([tokenizer.eot_id] + tokenizer.encode(prompt))[-block_size:]


def stream_text(model, tokenizer, prompt: list[int], max_new_tokens: int, device: torch.device,
                num_samples: int = 1, out: TextIO | None = None, **sampling) -> list[str]:
    """Generate num_samples continuations of the prompt as one batch, each up to max_new_tokens long and ending at
    the end of its document. The first is written to `out` as it comes, ending with a newline once all are done (the
    others are only returned: interleaved streams would be unreadable). `out` defaults to sys.stdout as it is at the
    call (so a redirection of it is followed). Returns the generated texts."""
    out = sys.stdout if out is None else out
    idx = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
    ids = [[] for _ in range(num_samples)]
    ended = [False] * num_samples
    shown = ""
    for tokens in model.generate_tokens(idx, max_new_tokens, **sampling):
        for row, token in enumerate(tokens.tolist()):
            if not ended[row]:
                ended[row] = token == tokenizer.eot_id
                if not ended[row]:
                    ids[row].append(token)
        if all(ended):
            break
        if ended[0]:
            continue
        text = tokenizer.decode(ids[0])
        # A character split across byte-fallback tokens decodes as U+FFFD until its last byte arrives: wait for it.
        if text.endswith("\ufffd"):
            continue
        out.write(text[len(shown):])
        out.flush()
        shown = text
    texts = [tokenizer.decode(row) for row in ids]
    out.write(texts[0][len(shown):] + "\n")
    out.flush()
    return texts
