"""Output vocabularies for the CTC tasks: characters, phones (space-separated symbols) and sentencepiece BPE.

Every tokenizer reserves id 0 for the CTC blank, has ``encode(text) -> list[int]``, ``decode(ids) -> str``,
``vocab_size`` (blank included) and saves itself to a JSON file (BPE also keeps its ``.model`` next to it)
so a trained head can be reloaded with :func:`load_tokenizer`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from speechssl.utils.io import atomic_write_json

__all__ = ["CharTokenizer", "PhoneTokenizer", "BPETokenizer", "build_tokenizer", "load_tokenizer"]

BLANK = "<blank>"
UNK = "<unk>"


class _ListTokenizer:
    kind = "list"
    sep = ""

    def __init__(self, symbols: list[str]):
        self.symbols = [BLANK, UNK] + [s for s in symbols if s not in (BLANK, UNK)]
        self.index = {s: i for i, s in enumerate(self.symbols)}

    @property
    def vocab_size(self) -> int:
        return len(self.symbols)

    def _split(self, text: str) -> list[str]:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        return [self.index.get(s, 1) for s in self._split(text)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.sep.join(self.symbols[i] for i in ids if i > 1)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, {"kind": self.kind, "symbols": self.symbols[2:]})


class CharTokenizer(_ListTokenizer):
    """Characters of the normalised text; words are separated by a space symbol."""

    kind = "char"

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "CharTokenizer":
        chars = sorted({c for t in texts for c in " ".join(t.split())})
        return cls(chars)

    def _split(self, text: str) -> list[str]:
        return list(" ".join(text.split()))


class PhoneTokenizer(_ListTokenizer):
    """Whitespace-separated symbols (phones); decoding joins them with single spaces."""

    kind = "phone"
    sep = " "

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "PhoneTokenizer":
        return cls(sorted({p for t in texts for p in t.split()}))

    def _split(self, text: str) -> list[str]:
        return text.split()


class BPETokenizer:
    """A sentencepiece model (BPE or unigram); ids are shifted by one so that 0 stays the CTC blank."""

    kind = "bpe"

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        self.model_file = str(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=self.model_file)

    @classmethod
    def train(cls, texts: Iterable[str], out_prefix: str | os.PathLike, vocab_size: int = 300,
              model_type: str = "bpe") -> "BPETokenizer":
        import sentencepiece as spm

        out_prefix = Path(out_prefix)
        out_prefix.parent.mkdir(parents=True, exist_ok=True)
        text_file = out_prefix.with_suffix(".txt")
        text_file.write_text("\n".join(" ".join(t.split()) for t in texts) + "\n")
        spm.SentencePieceTrainer.train(
            input=str(text_file), model_prefix=str(out_prefix), vocab_size=vocab_size, model_type=model_type,
            character_coverage=1.0, bos_id=-1, eos_id=-1, unk_id=0, hard_vocab_limit=False,
            minloglevel=2,
        )
        return cls(str(out_prefix) + ".model")

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size() + 1

    def encode(self, text: str) -> list[int]:
        return [i + 1 for i in self.sp.encode(" ".join(text.split()))]

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([i - 1 for i in ids if i > 0])

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, {"kind": self.kind, "model_file": os.path.abspath(self.model_file)})


def build_tokenizer(kind: str, texts: list[str], work_dir: str | os.PathLike | None = None,
                    vocab_size: int = 300):
    """Fit a tokenizer of ``kind`` (char | phone | bpe) on training ``texts``."""
    if kind == "char":
        return CharTokenizer.from_texts(texts)
    if kind == "phone":
        return PhoneTokenizer.from_texts(texts)
    if kind == "bpe":
        if work_dir is None:
            raise ValueError("a BPE tokenizer needs a work_dir to keep its sentencepiece model")
        return BPETokenizer.train(texts, Path(work_dir) / "bpe", vocab_size=vocab_size)
    raise ValueError(f"unknown tokenizer '{kind}' (config key tokenizer): choose char or bpe (phone is PR's)")


def load_tokenizer(path: str | os.PathLike):
    with open(path) as f:
        d = json.load(f)
    if d["kind"] == "char":
        return CharTokenizer(d["symbols"])
    if d["kind"] == "phone":
        return PhoneTokenizer(d["symbols"])
    if d["kind"] == "bpe":
        return BPETokenizer(d["model_file"])
    raise ValueError(f"{path}: unknown tokenizer kind {d['kind']!r}")
