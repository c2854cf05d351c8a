"""Text from a model, printed as it is generated (shared by sample.py and train.py's closing sample)."""
import sys

import torch


def prompt_ids(tokenizer, prompt: str, block_size: int) -> list[int]:
    """The prompt's tokens after an end-of-document token (so an empty prompt starts a fresh document), keeping
    the last block_size tokens of a longer prompt."""
    return ([tokenizer.eot_id] + tokenizer.encode(prompt))[-block_size:]


def stream_text(model, tokenizer, prompt: list[int], max_new_tokens: int, device: torch.device,
                out=sys.stdout, **sampling) -> str:
    """Generate up to max_new_tokens after the prompt, writing the text to `out` as it comes; stops at the end of
    the document. Returns the generated text."""
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    ids, shown = [], ""
    for token in model.generate_tokens(idx, max_new_tokens, **sampling):
        token = int(token[0])
        if token == tokenizer.eot_id:
            break
        ids.append(token)
        text = tokenizer.decode(ids)
        # A character split across byte-fallback tokens decodes as U+FFFD until its last byte arrives: wait for it.
        if text.endswith("\ufffd"):
            continue
        out.write(text[len(shown):])
        out.flush()
        shown = text
    text = tokenizer.decode(ids)
    out.write(text[len(shown):] + "\n")
    out.flush()
    return text
