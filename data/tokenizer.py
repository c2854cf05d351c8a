"""The tokenizer data/prepare.py trains and saves next to the token files: a sentencepiece model wrapped so that
decode(encode(text)) == text for any text."""
import json
from pathlib import Path

import sentencepiece as spm

from tritongpt.errors import UserError

# sentencepiece stores a space as "▁" (U+2581) and decodes every "▁" back to a space, so that character in the text
# itself would come back as a space. encode() writes it as its three UTF-8 byte tokens instead, which decode to it.
SPACE_MARK = "\u2581"


class Tokenizer:
    def __init__(self, source: str | Path | bytes, origin: str | None = None):
        """source: a tokenizer.model file, or the bytes of one (as a checkpoint carries them; origin then names
        them in errors)."""
        if isinstance(source, bytes):
            self.model, self.origin = source, origin or "the tokenizer"
        else:
            path = Path(source)
            if not path.is_file():
                raise UserError(f"no tokenizer model at {path}; build it with `python data/prepare.py` "
                                "(or point to the tokenizer.model it wrote)")
            self.model, self.origin = path.read_bytes(), str(path)
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self.model)
        except RuntimeError as e:
            reason = " ".join(str(e).split())
            raise UserError(f"{self.origin} is not a sentencepiece model ({reason}); "
                            "rebuild it with `python data/prepare.py`") from None
        self._mark_ids = [self._sp.piece_to_id(f"<0x{byte:02X}>") for byte in SPACE_MARK.encode()]
        if self._sp.eos_id() < 0 or not all(self._sp.is_byte(i) for i in self._mark_ids):
            raise UserError(f"{self.origin} has no end-of-document token or no byte fallback, so it was not built by "
                            "data/prepare.py; rebuild it with `python data/prepare.py`")
        self.vocab_size: int = self._sp.get_piece_size()
        self.eot_id: int = self._sp.eos_id()

    @classmethod
    def from_meta(cls, meta_path: str | Path) -> "Tokenizer":
        """The tokenizer a dataset's meta.json names (its path is relative to the meta.json's directory)."""
        meta_path = Path(meta_path)
        try:
            name = json.loads(meta_path.read_text())["tokenizer"]
        except FileNotFoundError:
            raise UserError(f"{meta_path} not found; build the dataset with `python data/prepare.py`") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{meta_path} is not a dataset description ({type(e).__name__}: {e}); "
                            "rebuild it with `python data/prepare.py`") from None
        return cls(meta_path.parent / name)

    def encode(self, text: str) -> list[int]:
        """The token ids of text, with no end-of-document token."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        """encode() of each text, on that many threads."""
        parts = [text.split(SPACE_MARK) for text in texts]
        encoded = iter(self._sp.encode([part for text in parts for part in text], num_threads=threads))
        batch = []
        for text in parts:
            ids = next(encoded)
            for _ in text[1:]:
                ids += self._mark_ids + next(encoded)
            batch.append(ids)
        return batch

    def decode(self, ids) -> str:
        """The text of a sequence of token ids (any iterable of ints; end-of-document tokens decode to nothing)."""
        return self._sp.decode([int(i) for i in ids])


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer in a file given by the user: a sentencepiece model as data/prepare.py writes it."""
    return Tokenizer(path)
