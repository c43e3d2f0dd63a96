"""The token-level ALinFiK student: LinFiK's per-position parts learnt from the LM's tokens, a lookup to score.

A sample-level student sees one number per labelled sample. LinFiK is linear in the sample's gradient, and the
gradient is a sum over positions, so the teacher splits exactly into per-position parts
(:func:`jaxval.valuation.linfik.linfik_parts`, from the same LoGra pass that labels the sample): 80 labelled
responses of ~40 tokens give ~3,000 targets instead of 80. This student fits those parts and scores a sample by
the sum of its predicted parts. On the Howdy! pool (``experiments/results/howdy_finetune``) it is the best design
of the cross-validation inside the 80 labels and the best student on the held-out samples (see its README).

The part at a used position ``p`` (it reads token ``x_p = tokens[p]`` and predicts ``y_p = tokens[p+1]``, a loss
token: ``weights[p+1] > 0``) is modelled as

    c_p = wᵀ φ_p + a[y_p] + b[(x_p, y_p)],

``φ_p`` = the LM's embedding-table row of ``y_p`` (divided by the table's mean row norm), indicators of the
position ``r = p − p_0`` counted from the row's first used position (``r = 0, 1, 2`` and ``r ≥ 3``) and
``min(r, 60)/60`` with its square; ``a`` a value per predicted token id, ``b`` per (read, predicted) pair.

With ``expected`` (:func:`expected_rows`: one forward pass of the LM, no backward, no per-example gradient, no
projection), ``φ_p`` also holds ``(table[y_p] − ē_p) / scale`` with ``ē_p = Σ_w softmax(logits_p)_w table[w]``: for
a tied-embedding LM, the direction in which the loss of ``y_p`` pulls the final hidden state (``−∂ℓ_p/∂h_p``
through the head), i.e. where the LM's own prediction at ``p`` differs from the token it must learn. Tokens alone
cannot tell a confidently predicted token (a part near 0) from a surprising one; on the Howdy! pool this feature
raises the held-out Spearman from 0.64 to 0.85 (``experiments/results/howdy_finetune``). For an LM with an untied
head, pass the head's ``[V, d]`` rows as ``table``. The fit
is ridge regression with penalties ``λ‖w‖² + (λ/token_weight)‖a‖² + (λ/pair_weight)‖b‖²`` — kernel ridge with
``k = φᵀφ' + token_weight·[y = y'] + pair_weight·[(x, y) = (x', y')]`` solved in its dual (one ``[M, M]`` system
for the ``M`` training positions, float64), then stored as ``w`` and the two tables: a token or pair never seen in
training adds 0. Scoring is a gather and a dot product per token; the LM never runs.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Mapping

import numpy as np

from jaxval._src.errors import ConfigError

__all__ = ["TokenStudent", "expected_rows", "expected_rows_fn", "fit_token_student", "token_positions"]

N_POS = 3          # indicators r = 0 .. N_POS-1, then r >= N_POS
R_CAP = 60.0       # the linear and quadratic position terms saturate here


def _table_sha256(table: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(table, np.float32).tobytes()).hexdigest()


def _checksum(table: np.ndarray) -> tuple[float, float]:
    """A cheap fingerprint of a verified table: its sum and its row sums weighted by the row index (float64)."""
    rows = table.sum(1, dtype=np.float64)
    return float(rows.sum()), float(rows @ np.arange(1, len(rows) + 1, dtype=np.float64))


def checked_tokens(tokens, weights, table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(tokens, weights, table as float32)`` after the checks every token-table feature needs: ``tokens`` and
    ``weights`` both ``[n, T]``, integer ids, a ``[V, d]`` table."""
    tokens, w, table = np.asarray(tokens), np.asarray(weights), np.asarray(table, np.float32)
    if tokens.ndim != 2 or w.shape != tokens.shape:
        raise ConfigError(f"tokens and weights must both be [n, T]; got {tokens.shape} and {w.shape}")
    if table.ndim != 2:
        raise ConfigError(f"table must be [V, d]; got {table.shape}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ConfigError(f"tokens must be integer ids, got {tokens.dtype}")
    return tokens, w, table


def check_ids(ids: np.ndarray, vocab: int) -> None:
    """The token ids a feature reads must index the table's ``vocab`` rows."""
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ConfigError(f"token ids in [{ids.min()}, {ids.max()}] outside the table's {vocab} rows")


def expected_rows_fn(logits_fn, table):
    """``rows(data, batch_size=16) -> [n, T, d]`` float32: at every position the table row expected under the LM's
    next-token distribution, ``Σ_w softmax(logits)_w table[w]``, for the token student's ``expected`` feature.

    ``logits_fn(batch) -> [B, T, V]``: a batch is ``data`` with a leading example axis, cut into ``batch_size``
    rows (the last padded); its position ``p`` the logits that read token ``p`` and predict token ``p+1`` of the
    rows the student scores (for tokens ``[n, T+1]``: the LM on ``tokens[:, :-1]``). Any JAX model: only its
    logits are read. The step is jit-compiled once per batch shape and kept by the returned function: build it once
    and call it on every pool (a new ``expected_rows_fn`` compiles again)."""
    import jax
    import jax.numpy as jnp

    from jaxval._src.batching import padded_batches

    tab = jnp.asarray(np.asarray(table, np.float32))
    if tab.ndim != 2:
        raise ConfigError(f"table must be [V, d]; got {tab.shape}")

    def step(batch):
        logits = logits_fn(batch)
        if logits.ndim != 3 or logits.shape[-1] != tab.shape[0]:          # static shapes: raised while tracing
            raise ConfigError(f"logits_fn must return [B, T, V] with V = the table's {tab.shape[0]} rows; got "
                              f"{logits.shape}")
        return jnp.matmul(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), tab,
                          precision=jax.lax.Precision.HIGHEST)

    jstep = jax.jit(step)

    def rows(data, batch_size: int = 16) -> np.ndarray:
        return np.concatenate([np.asarray(jstep(batch))[:nv] for _, nv, batch in padded_batches(data, batch_size)])

    return rows


def expected_rows(logits_fn, data, table, *, batch_size: int = 16) -> np.ndarray:
    """``[n, T, d]``: :func:`expected_rows_fn` ``(logits_fn, table)(data, batch_size)`` (compiled for this call
    only; to score several pools, build :func:`expected_rows_fn` once)."""
    return expected_rows_fn(logits_fn, table)(data, batch_size)


def _checked_expected(expected, tokens, table) -> np.ndarray:
    e = np.asarray(expected, np.float32)
    want = (tokens.shape[0], tokens.shape[1] - 1, table.shape[1])
    if e.shape != want:
        raise ConfigError(f"expected must be [n, T, d] = {list(want)} for tokens {list(tokens.shape)} (position p "
                          f"reads token p) and a [V, {table.shape[1]}] table; got {list(e.shape)}")
    if not np.isfinite(e).all():
        raise ConfigError("expected holds non-finite values")
    return e


def token_positions(tokens, weights, table, scale: float | None = None, expected=None) -> dict[str, np.ndarray]:
    """The used positions of every row and their features.

    tokens ``[n, T+1]`` int (the sequence the LM reads, the targets one step on), weights ``[n, T+1]`` (``> 0``:
    a loss token), table ``[V, d]``, expected ``[n, T, d]`` or None (:func:`expected_rows`). Position ``p < T``
    is used when ``weights[:, p+1] > 0``. Returns ``rows``, ``cols`` (``p``) ``[M]``, ``read`` / ``pred`` token
    ids ``[M]``, ``phi`` ``[M, d + N_POS + 3]`` float64 (``+ d`` with ``expected``: ``(table[pred] − expected) /
    scale`` last) and ``scale`` (the table's mean row norm unless given)."""
    tokens, w, table = checked_tokens(tokens, weights, table)
    used = w[:, 1:] > 0
    rows, cols = np.nonzero(used)
    first = np.where(used.any(1), used.argmax(1), 0)
    r = (cols - first[rows]).astype(np.float64)
    if scale is None:
        scale = float(np.linalg.norm(table, axis=1).mean())
    check_ids(tokens, table.shape[0])
    pred, read = tokens[rows, cols + 1], tokens[rows, cols]
    onehot = np.stack([r == k for k in range(N_POS)] + [r >= N_POS], 1).astype(np.float64)
    rc = np.minimum(r, R_CAP)[:, None] / R_CAP
    row_y = table[pred].astype(np.float64)
    cols_ = [row_y / scale, onehot, rc, rc * rc]
    if expected is not None:
        cols_.append((row_y - _checked_expected(expected, tokens, table)[rows, cols]) / scale)
    phi = np.concatenate(cols_, 1)
    return {"rows": rows, "cols": cols, "read": read.astype(np.int64), "pred": pred.astype(np.int64),
            "phi": phi, "scale": scale}


def _lookup(keys: np.ndarray, vals: np.ndarray, q: np.ndarray) -> np.ndarray:
    """``vals`` at ``q`` for the sorted ``keys``; 0 where ``q`` is not a key."""
    if not len(keys):
        return np.zeros(len(q))
    i = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
    return np.where(keys[i] == q, vals[i], 0.0)


class TokenStudent:
    """A fitted token-level student (:func:`fit_token_student`); :meth:`score` ``[n]``, :meth:`position_parts`."""

    kind = "token_ridge"

    def __init__(self, w, token_ids, token_vals, pair_keys, pair_vals, meta: Mapping):
        self.w, self.meta = np.asarray(w, np.float64), dict(meta)
        self.token_ids, self.token_vals = np.asarray(token_ids, np.int64), np.asarray(token_vals, np.float64)
        self.pair_keys, self.pair_vals = np.asarray(pair_keys, np.int64), np.asarray(pair_vals, np.float64)
        self._verified = None            # (weak reference, checksum) of the last table object whose sha256 matched

    def _check_table(self, table):
        """The table as float32, refused unless its sha256 is the fitted one's. Hashed in full once per table
        object; the same array passed again is re-checked by a cheap checksum (two float64 sums), and hashed again
        when that moved (a table changed in place)."""
        t = np.asarray(table, np.float32)
        if self._verified is not None and self._verified[0]() is t and self._verified[1] == _checksum(t):
            return t
        if t.shape != tuple(self.meta["table_shape"]) or _table_sha256(t) != self.meta["table_sha256"]:
            raise ConfigError(f"this student was fitted with another embedding table (shape "
                              f"{tuple(self.meta['table_shape'])}, sha256 {self.meta['table_sha256'][:12]}); got shape "
                              f"{t.shape}: pass the target LM's own table")
        self._verified = (weakref.ref(t), _checksum(t))
        return t

    @property
    def uses_expected(self) -> bool:
        """Whether scoring needs the LM's forward (:func:`expected_rows`): fitted with ``expected``."""
        return bool(self.meta.get("expected", False))

    def position_parts(self, tokens, weights, table, expected=None) -> np.ndarray:
        """``[n, T]`` predicted parts (0 at unused positions), ``tokens``/``weights`` ``[n, T+1]``; ``expected``
        ``[n, T, d]`` exactly when the student was fitted with it."""
        t = self._check_table(table)
        if self.uses_expected != (expected is not None):
            raise ConfigError("this student was fitted " + (
                "with the LM's expected rows: pass expected=expected_rows(...) of the rows it scores"
                if self.uses_expected else "on tokens alone: it takes no expected rows"))
        pos = token_positions(tokens, weights, t, scale=self.meta["scale"], expected=expected)
        vocab = t.shape[0]
        c = (pos["phi"] @ self.w + _lookup(self.token_ids, self.token_vals, pos["pred"])
             + _lookup(self.pair_keys, self.pair_vals, pos["read"] * vocab + pos["pred"]))
        out = np.zeros((len(tokens), np.shape(tokens)[1] - 1))
        out[pos["rows"], pos["cols"]] = c
        return out

    def score(self, tokens, weights, table, expected=None) -> np.ndarray:
        """``[n]`` predicted LinFiK: the sum of the predicted parts."""
        return self.position_parts(tokens, weights, table, expected).sum(1)

    def save(self, path: str, overwrite: bool = False) -> str:
        from jaxval._src import checkpoint

        arrays = {"w": self.w, "token_ids": self.token_ids, "token_vals": self.token_vals,
                  "pair_keys": self.pair_keys, "pair_vals": self.pair_vals}
        return checkpoint.save(path, arrays, self.meta | {"kind": self.kind}, overwrite=overwrite)

    @classmethod
    def load(cls, path: str) -> "TokenStudent":
        from jaxval._src import checkpoint

        arrays, meta = checkpoint.load(path)
        if meta.get("kind") != cls.kind:
            raise ConfigError(f"{path} holds a {meta.get('kind', 'frozen-feature')!r} student, not a {cls.kind!r} one")
        return cls.from_checkpoint(arrays, meta)

    @classmethod
    def from_checkpoint(cls, arrays: Mapping, meta: Mapping) -> "TokenStudent":
        """The student from a checkpoint's arrays and meta, already read (``alinfik.load_student``)."""
        return cls(**{k: np.asarray(arrays[k]) for k in ("w", "token_ids", "token_vals", "pair_keys", "pair_vals")},
                   meta=meta)


def fit_token_student(tokens, weights, parts, table, *, expected=None, ridge: float = 10.0,
                      token_weight: float = 3.0, pair_weight: float = 10.0,
                      max_positions: int = 20000) -> TokenStudent:
    """Fit the token-level student (module docstring) to LinFiK's per-position parts of the labelled samples.

    tokens, weights ``[n, T+1]`` (as :func:`token_positions`), parts ``[n, T]``
    (:func:`jaxval.valuation.linfik.linfik_parts` of the LM whose products read ``tokens[:, :T]``), table
    ``[V, d]`` the LM's embedding table, expected ``[n, T, d]`` (:func:`expected_rows` of the same rows) or None:
    then scoring needs it too. ``ridge`` λ > 0, ``token_weight`` / ``pair_weight`` ≥ 0 (0 drops the
    table). The dual system is ``[M, M]`` for the ``M`` used positions: ``max_positions`` bounds its memory
    (8·M² bytes)."""
    parts = np.asarray(parts, np.float64)
    tokens = np.asarray(tokens)
    if parts.ndim != 2 or tokens.ndim != 2 or parts.shape != (tokens.shape[0], tokens.shape[1] - 1):
        raise ConfigError(f"parts must be [n, T] for tokens [n, T+1] (position p reads token p, predicts p+1); "
                          f"got parts {parts.shape}, tokens {tokens.shape}")
    if not np.isfinite(parts).all():
        raise ConfigError("parts hold non-finite values")
    if not ridge > 0 or token_weight < 0 or pair_weight < 0:
        raise ConfigError(f"need ridge > 0 and weights >= 0; got ridge={ridge}, token_weight={token_weight}, "
                          f"pair_weight={pair_weight}")
    table = np.asarray(table, np.float32)
    pos = token_positions(tokens, weights, table, expected=expected)
    m = len(pos["rows"])
    if m == 0:
        raise ConfigError("no used positions: weights mark no loss token after the first position")
    if m > max_positions:
        raise ConfigError(f"{m} training positions: the dual system would be [{m}, {m}] ({8 * m * m / 2**30:.1f} GiB); "
                          f"label fewer samples or raise max_positions")
    y = parts[pos["rows"], pos["cols"]]
    vocab = table.shape[0]
    pair = pos["read"] * vocab + pos["pred"]
    phi, pred = pos["phi"], pos["pred"]
    k = phi @ phi.T
    if token_weight:
        k += token_weight * (pred[:, None] == pred[None, :])
    if pair_weight:
        k += pair_weight * (pair[:, None] == pair[None, :])
    k[np.diag_indices(m)] += ridge
    alpha = np.linalg.solve(k, y)
    token_ids, inv = np.unique(pred, return_inverse=True)
    token_vals = token_weight * np.bincount(inv, alpha, len(token_ids))
    pair_keys, pinv = np.unique(pair, return_inverse=True)
    pair_vals = pair_weight * np.bincount(pinv, alpha, len(pair_keys))
    meta = {"ridge": float(ridge), "token_weight": float(token_weight), "pair_weight": float(pair_weight),
            "scale": pos["scale"], "table_shape": list(table.shape), "table_sha256": _table_sha256(table),
            "n_train": int(tokens.shape[0]), "n_positions": int(m), "expected": expected is not None,
            "parts_share_used": float(np.abs(y).sum() / max(np.abs(parts).sum(), 1e-30))}
    return TokenStudent(phi.T @ alpha, token_ids, token_vals, pair_keys, pair_vals, meta)
