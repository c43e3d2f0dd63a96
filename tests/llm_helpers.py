"""A tiny GPT factory for the CLI's LLM flow (named in a config as ``model.factory: llm_helpers:tiny_gpt``)."""

from flax import nnx

from jaxval.data.corpus import ByteTokenizer
from jaxval.models import gpt


def tiny_gpt(block_size: int = 48, d_model: int = 16, n_layer: int = 1, n_head: int = 2, seed: int = 0):
    """``(GPT over UTF-8 bytes, ByteTokenizer())``."""
    cfg = gpt.GPTConfig(vocab_size=256, block_size=block_size, d_model=d_model, n_layer=n_layer, n_head=n_head)
    return gpt.GPT(cfg, rngs=nnx.Rngs(seed)), ByteTokenizer()


def documents(n: int = 4):
    """A data factory: ``n`` short documents as (id, text) pairs."""
    return [(f"doc{i}", f"document {i}: the cat sat on the mat {i} times.") for i in range(n)]
