"""PyTorch twins of jaxval's nnx models, same shapes and module names; weights loaded from the npz the
jaxval worker exports (nnx kernel [in, out] -> torch weight [out, in]). GELU is the tanh approximation, as
flax's ``nnx.gelu`` default. ``Llama`` mirrors ``jaxval.models.llama`` (config from the JSON next to the
npz)."""

from __future__ import annotations

import json
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class ResidualMLP(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.ln = nn.LayerNorm(d, eps=1e-5)
        self.fc = nn.Linear(d, hidden)
        self.proj = nn.Linear(hidden, d)

    def forward(self, x):
        return x + self.proj(F.gelu(self.fc(self.ln(x)), approximate="tanh"))


class TokenMLP(nn.Module):
    def __init__(self, vocab=1000, d=256, n_block=4, hidden=1024):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList([ResidualMLP(d, hidden) for _ in range(n_block)])
        self.ln_f = nn.LayerNorm(d, eps=1e-5)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.embed(tokens)
        for b in self.blocks:
            h = b(h)
        return self.head(self.ln_f(h))


def token_loss(model, batch):
    """Per-example sum of next-token cross-entropies [B] (mask[:, 1:] weighted), as jaxval's lm_loss_fn."""
    tok = batch["tokens"]
    logits = model(tok[:, :-1])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tok[:, 1:].reshape(-1).long(),
                         reduction="none").reshape(tok.shape[0], -1)
    return (ce * batch["mask"][:, 1:]).sum(-1)


class MLP(nn.Module):
    def __init__(self, sizes=(784, 512, 256, 10)):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])])

    def forward(self, x):
        for i, l in enumerate(self.layers):
            x = l(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def mlp_loss(model, batch):
    return F.cross_entropy(model(batch["x"]), batch["y"].long(), reduction="none")


def rope_tables(t, dh, base):
    """cos, sin [t, dh] in the "rotate half" layout (each frequency twice: first half, second half)."""
    inv = torch.from_numpy(1.0 / (base ** (np.arange(0, dh, 2, dtype=np.float64) / dh))).float()
    ang = torch.arange(t, dtype=torch.float32)[:, None] * inv
    ang = torch.cat([ang, ang], -1)
    return ang.cos(), ang.sin()


def apply_rope(x, cos, sin):
    """x [B, T, H, dh]; cos/sin [T, dh]."""
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos[:, None] + rot * sin[:, None]


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.nh, self.nkv, self.dh = c["n_head"], c["n_kv_head"], c["head_dim"] or c["d_model"] // c["n_head"]
        self.q_proj = nn.Linear(c["d_model"], self.nh * self.dh, bias=False)
        self.k_proj = nn.Linear(c["d_model"], self.nkv * self.dh, bias=False)
        self.v_proj = nn.Linear(c["d_model"], self.nkv * self.dh, bias=False)
        self.o_proj = nn.Linear(self.nh * self.dh, c["d_model"], bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = apply_rope(self.q_proj(x).view(b, t, self.nh, self.dh), cos, sin)
        k = apply_rope(self.k_proj(x).view(b, t, self.nkv, self.dh), cos, sin)
        v = self.v_proj(x).view(b, t, self.nkv, self.dh)
        g = self.nh // self.nkv            # query head j uses key/value head j // g, as jaxval's grouping
        k, v = (z.repeat_interleave(g, dim=2).transpose(1, 2) for z in (k, v))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.nh * self.dh))


class SwiGLU(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.gate_proj = nn.Linear(c["d_model"], c["d_ff"], bias=False)
        self.up_proj = nn.Linear(c["d_model"], c["d_ff"], bias=False)
        self.down_proj = nn.Linear(c["d_ff"], c["d_model"], bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(c["d_model"], eps=c["norm_eps"])
        self.attn = Attention(c)
        self.post_attention_layernorm = nn.RMSNorm(c["d_model"], eps=c["norm_eps"])
        self.mlp = SwiGLU(c)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """Tied output embedding only (SmolLM2)."""

    def __init__(self, c):
        super().__init__()
        assert c["tie_embeddings"], "untied lm_head not mirrored"
        self.c = c
        self.embed = nn.Embedding(c["vocab_size"], c["d_model"])
        self.blocks = nn.ModuleList([LlamaBlock(c) for _ in range(c["n_layer"])])
        self.norm = nn.RMSNorm(c["d_model"], eps=c["norm_eps"])

    def forward(self, tokens):
        cos, sin = rope_tables(tokens.shape[1], self.blocks[0].attn.dh, self.c["rope_base"])
        h = self.embed(tokens)
        for b in self.blocks:
            h = b(h, cos, sin)
        return self.norm(h) @ self.embed.weight.T


def build(workload: str, weights: str):
    """(model, per-example loss fn) with the weights of ``weights`` (npz of nnx paths '/'-joined)."""
    w = dict(np.load(weights))
    if workload == "token":
        m, loss = TokenMLP(), token_loss
    elif workload == "smollm2":
        with open(weights + ".json") as f:
            m, loss = Llama(json.load(f)), token_loss
    else:
        m, loss = MLP(), mlp_loss
    sd = {}
    for k, v in w.items():
        parts = k.split("/")
        leaf = parts[-1]
        name = ".".join(parts[:-1])
        if leaf == "kernel":
            sd[name + ".weight"] = torch.from_numpy(np.ascontiguousarray(v.T))
        elif leaf == "embedding":
            sd[name + ".weight"] = torch.from_numpy(v)
        elif leaf == "scale":
            sd[name + ".weight"] = torch.from_numpy(v)
        elif leaf == "bias":
            sd[name + ".bias"] = torch.from_numpy(v)
        else:
            raise KeyError(k)
    missing, unexpected = m.load_state_dict(sd, strict=True), None
    return m, loss


def train_step_times(model: nn.Module, loss_fn, batches, n: int, autocast: bool = False) -> dict:
    """Wall times of ``n`` training steps (forward + backward of the mean loss) over ``batches`` in turn;
    ``autocast``: under ``torch.autocast("cpu", bfloat16)``."""
    ts = []
    for i in range(n):
        b = batches[i % len(batches)]
        t0 = time.perf_counter()
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(model, b).mean()
        loss.backward()
        ts.append(time.perf_counter() - t0)
    return {"times": ts}
