"""PyTorch twins of jaxval's nnx models, same shapes; weights loaded from the npz the jaxval worker
exports (nnx kernel [in, out] -> torch weight [out, in]). GELU is the tanh approximation, as flax's
``nnx.gelu`` default."""

from __future__ import annotations

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


def build(workload: str, weights: str):
    """(model, per-example loss fn) with the weights of ``weights`` (npz of nnx paths '/'-joined)."""
    w = dict(np.load(weights))
    if workload == "token":
        m, loss = TokenMLP(), token_loss
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
