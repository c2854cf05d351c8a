"""The tokenizers a dataset is encoded with: the sentencepiece model data/prepare.py trains (the default), or a
Hugging Face tokenizer it is given (GPT-2's, to fine-tune GPT-2 on its own tokens). Both are wrapped so that
decode(encode(text)) == text for any text, and behind the same interface: encode, encode_batch, decode, vocab_size,
eot_id, and `model`, the bytes of the file that holds the tokenizer (what a dataset copies and a checkpoint carries).
"""
import importlib
import json
from pathlib import Path

import sentencepiece as spm

from tritongpt.errors import UserError

# sentencepiece stores a space as "▁" (U+2581) and decodes every "▁" back to a space, so that character in the text
# itself would come back as a space. encode() writes it as its three UTF-8 byte tokens instead, which decode to it.
SPACE_MARK = "\u2581"


class Tokenizer:
    """A sentencepiece model."""
    kind = "sentencepiece"
    file_name = "tokenizer.model"

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

    @staticmethod
    def from_meta(meta_path: str | Path) -> "Tokenizer | HuggingFaceTokenizer":
        """The tokenizer a dataset's meta.json names (its path is relative to the meta.json's directory)."""
        meta_path = Path(meta_path)
        try:
            meta = json.loads(meta_path.read_text())
            name, eot_id = meta["tokenizer"], meta.get("eot_id")
        except FileNotFoundError:
            raise UserError(f"{meta_path} not found; build the dataset with `python data/prepare.py`") from None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{meta_path} is not a dataset description ({type(e).__name__}: {e}); "
                            "rebuild it with `python data/prepare.py`") from None
        return load_tokenizer(meta_path.parent / name, eot_id)

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

    def huggingface_json(self) -> str:
        """This tokenizer as a Hugging Face tokenizer.json, which encodes and decodes every text as encode() and
        decode() do. Its vocabulary holds sentencepiece's pieces with a plain space where they hold SPACE_MARK: a
        SPACE_MARK in the text is then a character outside the vocabulary, which falls back to its three bytes, as
        encode() writes it. The end-of-document and unknown tokens are special tokens."""
        sentencepiece_model_pb2 = hugging_face_dependency("sentencepiece.sentencepiece_model_pb2")
        tokenizers = hugging_face_dependency("tokenizers")
        proto = sentencepiece_model_pb2.ModelProto.FromString(self.model)
        pieces = [p.piece.replace(SPACE_MARK, " ") for p in proto.pieces]
        unk_id = self._sp.unk_id()
        if proto.trainer_spec.model_type == proto.trainer_spec.UNIGRAM:
            scored = [(piece, p.score) for piece, p in zip(pieces, proto.pieces)]
            model = tokenizers.models.Unigram(scored, unk_id=unk_id, byte_fallback=True)
        else:  # bpe, or char: a vocabulary of single characters, so no merges
            vocab = {piece: i for i, piece in enumerate(pieces)}
            model = tokenizers.models.BPE(vocab, _merges(pieces, proto.pieces), unk_token=pieces[unk_id],
                                          byte_fallback=True)
        backend = tokenizers.Tokenizer(model)
        decoders = tokenizers.decoders
        backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        special = [piece for piece, p in zip(pieces, proto.pieces) if p.type in (p.CONTROL, p.UNKNOWN)]
        backend.add_special_tokens([tokenizers.AddedToken(piece, special=True, normalized=False) for piece in special])
        return backend.to_str()


def _merges(pieces: list[str], protos) -> list[tuple[str, str]]:
    """The merges of a sentencepiece BPE vocabulary: every split of an ordinary piece into two ordinary pieces, the
    merges that make a higher-scoring piece first, as sentencepiece merges the adjacent pair whose union scores
    highest."""
    score = {piece: p.score for piece, p in zip(pieces, protos) if p.type == p.NORMAL}
    merges = [(piece[:k], piece[k:]) for piece in score for k in range(1, len(piece))
              if piece[:k] in score and piece[k:] in score]
    return sorted(merges, key=lambda m: -score[m[0] + m[1]])


# The names an end-of-text token goes by, for a tokenizer that does not say which of its special tokens it is.
END_OF_TEXT_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")
# GPT-2's original pair of files, which a tokenizer.json is built from.
GPT2_FILES = ("vocab.json", "merges.txt")


class HuggingFaceTokenizer:
    """A Hugging Face tokenizer, run by the `tokenizers` library exactly as transformers runs it (with no
    beginning- or end-of-sequence tokens added)."""
    kind = "huggingface"
    file_name = "tokenizer.json"

    def __init__(self, source: str | Path | bytes, origin: str | None = None, eot_id: int | None = None):
        """source: a tokenizer directory (tokenizer.json, or GPT-2's vocab.json and merges.txt), a tokenizer.json
        file, or the bytes of one (as a checkpoint carries them; origin then names them in errors). eot_id: the
        end-of-text token's id when known (a dataset records it); else it is the token tokenizer_config.json names
        eos_token, else the one special token, else the special token named as END_OF_TEXT_NAMES names one."""
        Backend = hugging_face_dependency("tokenizers").Tokenizer
        eos_name = None
        if isinstance(source, bytes):
            text, self.origin = source.decode(), origin or "the tokenizer"
        else:
            path = Path(source)
            self.origin = str(path)
            if path.is_dir():
                text, eos_name = _read_tokenizer_directory(path)
            elif path.is_file():
                text = path.read_text(encoding="utf-8", errors="replace")
            else:
                raise UserError(f"no tokenizer at {path}; give a tokenizer directory (tokenizer.json, or vocab.json "
                                "and merges.txt) or a tokenizer.json file")
        try:
            self._backend = Backend.from_str(text)
        except Exception as e:  # the library raises its own exception type for a malformed file
            reason = " ".join(str(e).split())[:200]
            raise UserError(f"{self.origin} is not a Hugging Face tokenizer ({reason}); give the tokenizer.json "
                            "the tokenizers library or transformers' save_pretrained wrote") from None
        self.model: bytes = self._backend.to_str().encode()  # the library's own form, the same for equal tokenizers
        self.vocab_size: int = max(self._backend.get_vocab(with_added_tokens=True).values()) + 1
        self.eot_id: int = eot_id if eot_id is not None else self._end_of_text_id(eos_name)

    def _end_of_text_id(self, eos_name: str | None) -> int:
        special = [t.content for t in self._backend.get_added_tokens_decoder().values() if t.special]
        if eos_name is None:
            named = [name for name in END_OF_TEXT_NAMES if name in special]
            eos_name = special[0] if len(special) == 1 else named[0] if named else None
        token_id = None if eos_name is None else self._backend.token_to_id(eos_name)
        if token_id is None:
            raise UserError(f"{self.origin} has no end-of-text token (special tokens: {', '.join(special) or 'none'});"
                            " name one as eos_token in a tokenizer_config.json beside its tokenizer.json")
        return token_id

    def encode(self, text: str) -> list[int]:
        """The token ids of text, with no end-of-text token."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        """encode() of each text (the library picks its own number of threads)."""
        return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        """The text of a sequence of token ids (any iterable of ints; special tokens decode to nothing)."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def huggingface_json(self) -> str:
        return self.model.decode()


def _read_tokenizer_directory(path: Path) -> tuple[str, str | None]:
    """(the tokenizer.json text of a tokenizer directory, the eos_token its tokenizer_config.json names or None)."""
    config_file = path / "tokenizer_config.json"
    try:
        eos = json.loads(config_file.read_text()).get("eos_token") if config_file.is_file() else None
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{config_file} is not a tokenizer config ({e}); fix or remove it") from None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if (path / "tokenizer.json").is_file():
        return (path / "tokenizer.json").read_text(encoding="utf-8", errors="replace"), eos
    if not all((path / name).is_file() for name in GPT2_FILES):
        raise UserError(f"{path} holds no Hugging Face tokenizer: give a directory with tokenizer.json, or GPT-2's "
                        "vocab.json and merges.txt")
    # GPT-2's byte-level BPE, as transformers builds it from these two files.
    tokenizers = hugging_face_dependency("tokenizers")
    try:
        bpe = tokenizers.models.BPE.from_file(*(str(path / name) for name in GPT2_FILES))
    except Exception as e:
        raise UserError(f"{path}'s vocab.json and merges.txt are not a BPE tokenizer ({' '.join(str(e).split())}); "
                        "give GPT-2's own files") from None
    backend = tokenizers.Tokenizer(bpe)
    backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)
    eos = eos or "<|endoftext|>"
    if backend.token_to_id(eos) is not None:
        backend.add_special_tokens([tokenizers.AddedToken(eos, special=True, normalized=False)])
    return backend.to_str(), eos


# What Hugging Face tokenizers and the export need beyond the trainer's own dependencies.
HUGGING_FACE_PACKAGES = "tokenizers safetensors protobuf"


def hugging_face_dependency(module: str):
    """The module, or one line saying how to install what Hugging Face tokenizers and the export need."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UserError(f"this needs the {e.name or module} module, which is not installed; install it with "
                        f"`pip install {HUGGING_FACE_PACKAGES}` (or `pip install tritongpt[hf]`)") from None


def load_tokenizer(path: str | Path, eot_id: int | None = None) -> "Tokenizer | HuggingFaceTokenizer":
    """The tokenizer at path: a Hugging Face tokenizer for a directory or a .json file, else a sentencepiece
    model. eot_id: the end-of-text id a dataset records, for a Hugging Face tokenizer."""
    path = Path(path)
    if path.is_dir() or path.suffix == ".json":
        return HuggingFaceTokenizer(path, eot_id=eot_id)
    return Tokenizer(path)


def same_tokens(a: "Tokenizer | HuggingFaceTokenizer", b: "Tokenizer | HuggingFaceTokenizer") -> bool:
    """Whether two tokenizers give every text the same ids, as their content tells: the same vocabulary, merges,
    special tokens and pre-tokenization, compared in Hugging Face form (a sentencepiece model then equals its
    export)."""
    return _token_rules(a) == _token_rules(b)


def _token_rules(tokenizer) -> dict:
    spec = json.loads(tokenizer.huggingface_json())
    added = [(t["id"], t["content"], t["special"]) for t in spec.get("added_tokens", [])]
    return dict(model=spec["model"], normalizer=spec.get("normalizer"), pre_tokenizer=spec.get("pre_tokenizer"),
                added_tokens=sorted(added))


def tokenizer_from_bytes(kind: str, data: bytes, origin: str, eot_id: int | None = None):
    """A tokenizer from the bytes of its file (as a checkpoint carries them), of the given kind."""
    if kind == HuggingFaceTokenizer.kind:
        return HuggingFaceTokenizer(data, origin=origin, eot_id=eot_id)
    return Tokenizer(data, origin=origin)
