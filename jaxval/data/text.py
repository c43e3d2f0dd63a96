"""Text corpora, character / word tokenizers and fixed-length token blocks for language models."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

CORPORA = {
    "tinyshakespeare": "tinyshakespeare/input.txt",
    "wikitext-2-valid": "wikitext-2/valid.txt",
    "wikitext-2-test": "wikitext-2/test.txt",
}
_ALIASES = {"tiny_shakespeare": "tinyshakespeare", "shakespeare": "tinyshakespeare",
            "wikitext2-valid": "wikitext-2-valid", "wikitext-2-validation": "wikitext-2-valid",
            "wikitext2-test": "wikitext-2-test"}


def load_text(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> str:
    """The text of a named corpus (``tinyshakespeare``, ``wikitext-2-valid``, ``wikitext-2-test``, found
    in the data directory, see :func:`jaxval.data.data_dir`) or of a UTF-8 file path."""
    from jaxval.data import data_dir as _data_dir

    name = str(name_or_path)
    key = _ALIASES.get(name.lower(), name.lower())
    if key in CORPORA:
        path = _data_dir(data_dir, expect=[CORPORA[key]]) / CORPORA[key]
    elif Path(name).expanduser().is_file():
        path = Path(name).expanduser()
    else:
        raise FileNotFoundError(f"{name!r} is neither a known corpus ({', '.join(CORPORA)}) nor a file")
    return path.read_text(encoding="utf-8")


class _Vocabulary:
    """What both tokenizers share: ``vocab`` (list of tokens) and its size."""

    vocab: list

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)


class CharTokenizer(_Vocabulary):
    """Character-level tokenizer. ``vocab`` is a sequence of distinct single characters; id = position.

    ``CharTokenizer.from_text(text)`` builds the vocab from the sorted distinct characters of ``text``.
    Characters outside the vocab raise ``ValueError`` unless ``unk`` (a vocab character) is given.
    """

    def __init__(self, vocab: Sequence[str], unk: str | None = None):
        vocab = list(vocab)
        if any(not isinstance(c, str) or len(c) != 1 for c in vocab):
            raise ValueError("CharTokenizer vocab must be single characters")
        if len(set(vocab)) != len(vocab):
            raise ValueError("CharTokenizer vocab has duplicate characters")
        if unk is not None and unk not in vocab:
            raise ValueError(f"unk character {unk!r} is not in the vocab")
        self.vocab = vocab
        self.unk = unk
        cps = np.array([ord(c) for c in vocab], dtype=np.int64)
        order = np.argsort(cps, kind="stable")
        self._cps = cps
        self._sorted_cps = cps[order]
        self._sorted_ids = order.astype(np.int32)

    @classmethod
    def from_text(cls, text: str, unk: str | None = None) -> "CharTokenizer":
        chars = sorted(set(text) | ({unk} if unk else set()))
        return cls(chars, unk=unk)

    def encode(self, text: str) -> np.ndarray:
        """int32 [len(text)] ids."""
        cps = np.frombuffer(text.encode("utf-32-le"), dtype="<u4").astype(np.int64)
        if not len(self.vocab):
            if cps.size:
                raise ValueError("empty vocab")
            return np.zeros(0, np.int32)
        pos = np.clip(np.searchsorted(self._sorted_cps, cps), 0, len(self.vocab) - 1)
        ok = self._sorted_cps[pos] == cps
        ids = self._sorted_ids[pos]
        if not ok.all():
            if self.unk is None:
                bad = sorted({chr(c) for c in cps[~ok]})[:10]
                raise ValueError(f"characters not in the vocab: {bad!r}; build the tokenizer from this "
                                 "text or pass unk=")
            ids = np.where(ok, ids, np.int32(self.vocab.index(self.unk)))
        return ids.astype(np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.vocab)):
            raise ValueError(f"token ids must be in [0, {len(self.vocab)})")
        return self._cps[ids].astype("<u4").tobytes().decode("utf-32-le")


class WordTokenizer(_Vocabulary):
    """Whitespace word tokenizer with a fixed vocab; words outside it map to ``unk``.

    Vocab order: ``unk``, then ``eos`` (if any), then words. ``from_text(text, vocab_size=V)`` keeps the
    ``V`` most frequent words counting the specials (ties: first occurrence first). With ``eos`` set, each
    line of the text ends with the ``eos`` token (as in WikiText language modelling) and ``decode`` turns
    ``eos`` back into a newline. An ``<unk>`` already in the text (WikiText has them) is the unk token.
    """

    def __init__(self, vocab: Sequence[str], unk: str = "<unk>", eos: str | None = None):
        vocab = list(vocab)
        if len(set(vocab)) != len(vocab):
            raise ValueError("WordTokenizer vocab has duplicate words")
        if unk not in vocab:
            raise ValueError(f"unk token {unk!r} must be in the vocab")
        if eos is not None and eos not in vocab:
            raise ValueError(f"eos token {eos!r} must be in the vocab")
        self.vocab = vocab
        self.unk, self.eos = unk, eos
        self.index = {w: i for i, w in enumerate(vocab)}

    @staticmethod
    def _words(text: str, eos: str | None) -> list[str]:
        if eos is None:
            return text.split()
        out: list[str] = []
        for line in text.splitlines():
            out.extend(line.split())
            out.append(eos)
        return out

    @classmethod
    def from_text(cls, text: str, vocab_size: int | None = None, unk: str = "<unk>",
                  eos: str | None = None) -> "WordTokenizer":
        specials = [unk] + ([eos] if eos is not None else [])
        counts = Counter(w for w in cls._words(text, eos) if w not in specials)
        words = [w for w, _ in counts.most_common()]       # stable: ties keep first-occurrence order
        if vocab_size is not None:
            if vocab_size < len(specials):
                raise ValueError(f"vocab_size must be at least {len(specials)} (the special tokens)")
            words = words[: vocab_size - len(specials)]
        return cls(specials + words, unk=unk, eos=eos)

    def encode(self, text: str) -> np.ndarray:
        u = self.index[self.unk]
        get = self.index.get
        return np.fromiter((get(w, u) for w in self._words(text, self.eos)), dtype=np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self.vocab)):
            raise ValueError(f"token ids must be in [0, {len(self.vocab)})")
        words = [self.vocab[i] for i in ids.tolist()]
        if self.eos is None:
            return " ".join(words)
        lines, cur = [], []
        for w in words:
            if w == self.eos:
                lines.append(" ".join(cur) + "\n")
                cur = []
            else:
                cur.append(w)
        return "".join(lines) + " ".join(cur)


def make_blocks(token_ids, block_len: int, stride: int | None = None) -> dict:
    """Cut a 1-D token sequence into blocks: ``tokens`` int32 [n_blocks, block_len] where block i is
    ``token_ids[i·stride : i·stride + block_len]`` (``stride`` defaults to ``block_len``: no overlap;
    a tail shorter than a block is dropped), and ``mask`` float32 ones of the same shape (every token
    counts in the loss). A language-model loss predicts ``tokens[:, 1:]`` from ``tokens[:, :-1]``.
    """
    ids = np.asarray(token_ids).reshape(-1)
    if ids.size and ids.dtype.kind not in "iu":
        raise ValueError(f"token_ids must be integers, got {ids.dtype}")
    block_len = int(block_len)
    stride = block_len if stride is None else int(stride)
    if block_len <= 0 or stride <= 0:
        raise ValueError("block_len and stride must be positive")
    if ids.size < block_len:
        raise ValueError(f"need at least block_len={block_len} tokens, got {ids.size}")
    windows = np.lib.stride_tricks.sliding_window_view(ids, block_len)[::stride]
    tokens = np.ascontiguousarray(windows, dtype=np.int32)
    return {"tokens": tokens, "mask": np.ones(tokens.shape, dtype=np.float32)}
