"""Text corpora for language models: documents from plain text or JSON lines, cut into token chunks.

A pipeline config's ``data:`` section for a language model (``jaxval log`` / ``fit`` / ``attribute``)::

    data:
      kind: corpus
      corpus: notes.jsonl        # a file (plain text: one document; .jsonl: one {"id", "text"} per line)
                                 #   or a named corpus (tinyshakespeare, wikitext-2-valid, wikitext-2-test)
      format: null               # text | jsonl (null: from the file's suffix)
      text_key: text             # jsonl keys
      id_key: id                 #   (a missing id: the line number)
      block_len: 128             # tokens per chunk
      stride: null               # chunk start every `stride` tokens (null: block_len, no overlap)
      add_bos: false             # start every document with the tokenizer's bos_id
      test_fraction: 0.0         # the last fraction of the chunks is the `test` split
      limit: null                # keep the first `limit` chunks

or ``data: {factory: "pkg.module:function", args: {...}}``: the function returns the documents (an
iterable of strings, ``(id, text)`` pairs or ``{"id", "text"}`` mappings; chunked as above) or the
batch itself (a mapping of arrays with a leading example axis, e.g. ``tokens`` / ``mask``; an optional
``ids`` entry gives the example ids).

Documents are tokenised with the model's tokenizer and cut into chunks of ``block_len`` tokens; the tail of
a document is a shorter chunk padded on the right (``mask`` 0 there), so no text is dropped (a tail of a
single token, which predicts nothing, is). Chunk ids are ``"<document id>:<chunk index>"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ByteTokenizer", "read_documents", "chunk_documents", "build_data"]


class ByteTokenizer:
    """UTF-8 bytes as tokens (vocab 256): a tokenizer for small models that needs no vocabulary file."""

    vocab_size = 256
    stop_ids: tuple = ()

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        del skip_special_tokens
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")


def _config_error(msg: str) -> Exception:
    try:
        from jaxval._src.errors import ConfigError
    except ImportError:  # pragma: no cover - older layout
        from jaxval.cli.config import ConfigError
    return ConfigError(msg)


def read_documents(source: str | os.PathLike, *, format: str | None = None, text_key: str = "text",
                   id_key: str = "id", data_dir: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """``[(id, text)]`` of a corpus: a plain text file (one document, id = the file's stem), a JSON-lines
    file (one document per line: ``text_key`` and ``id_key``, the line number when the id is missing) or a
    named corpus of :func:`jaxval.data.load_text` (one document)."""
    from jaxval.data.text import load_text

    path = Path(str(source)).expanduser()
    fmt = format or ("jsonl" if path.suffix.lower() in (".jsonl", ".ndjson") else "text")
    if fmt not in ("text", "jsonl"):
        raise _config_error(f"data.format must be text or jsonl, got {fmt!r}")
    if fmt == "text":
        return [(path.stem if path.is_file() else str(source), load_text(source, data_dir=data_dir))]
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} not found")
    docs, seen = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise _config_error(f"{path}:{n + 1} is not valid JSON ({e.msg})") from e
            if not isinstance(rec, Mapping) or not isinstance(rec.get(text_key), str):
                raise _config_error(f"{path}:{n + 1} has no string {text_key!r} (data.text_key)")
            did = str(rec.get(id_key, n))
            if did in seen:
                raise _config_error(f"{path}:{n + 1}: document id {did!r} ({id_key!r}) is not unique")
            seen.add(did)
            docs.append((did, rec[text_key]))
    return docs


def _as_documents(items: Iterable[Any]) -> list[tuple[str, str]]:
    out = []
    for n, it in enumerate(items):
        if isinstance(it, str):
            out.append((str(n), it))
        elif isinstance(it, Mapping):
            out.append((str(it.get("id", n)), str(it["text"])))
        else:
            did, text = it
            out.append((str(did), str(text)))
    return out


def chunk_documents(docs: Sequence[tuple[str, str]], tokenizer, block_len: int, stride: int | None = None,
                    add_bos: bool = False) -> tuple[dict, np.ndarray]:
    """``({"tokens": int32 [N, block_len], "mask": float32 [N, block_len]}, ids [N])``: every document's
    tokens cut into chunks starting every ``stride`` tokens (default ``block_len``); a document's tail is a
    right-padded chunk (mask 0 on the padding); chunk ids ``"<doc id>:<k>"``."""
    block_len = int(block_len)
    stride = block_len if stride is None else int(stride)
    if block_len < 2 or stride < 1:
        raise _config_error(f"data.block_len must be >= 2 and data.stride >= 1, got {block_len}, {stride}")
    bos = getattr(tokenizer, "bos_id", None) if add_bos else None
    if add_bos and bos is None:
        raise _config_error("data.add_bos: the tokenizer has no bos_id")
    rows, masks, ids = [], [], []
    for did, text in docs:
        toks = ([int(bos)] if bos is not None else []) + [int(t) for t in tokenizer.encode(text)]
        for k, start in enumerate(range(0, max(len(toks) - 1, 1), stride)):
            piece = toks[start: start + block_len]
            if len(piece) < 2:
                break
            row = np.zeros(block_len, np.int32)
            row[: len(piece)] = piece
            m = np.zeros(block_len, np.float32)
            m[: len(piece)] = 1.0
            rows.append(row)
            masks.append(m)
            ids.append(f"{did}:{k}")
            if start + block_len >= len(toks):
                break
    if not rows:
        raise _config_error("the corpus gives no chunk of at least 2 tokens")
    return {"tokens": np.stack(rows), "mask": np.stack(masks)}, np.asarray(ids)


def build_data(dcfg: Mapping, tokenizer=None) -> tuple[dict, np.ndarray, dict]:
    """``(data, ids, info)`` of a ``kind: corpus`` or ``factory:`` data section (see the module docstring),
    tokenised with ``tokenizer``; ``split`` train | test | all over the chunks by ``test_fraction``."""
    if dcfg.get("factory"):
        from jaxval.models.factory import load_callable

        out = load_callable(dcfg["factory"], "data.factory")(**(dcfg.get("args") or {}))
        if isinstance(out, Mapping):
            data = {k: np.asarray(v) for k, v in out.items() if k != "ids"}
            n = len(next(iter(data.values())))
            ids = np.asarray(out["ids"]).astype(str) if "ids" in out else np.arange(n).astype(str)
        else:
            data, ids = _chunked(_as_documents(out), tokenizer, dcfg)
    else:
        if not dcfg.get("corpus"):
            raise _config_error("data.corpus (a .txt / .jsonl file or a corpus name) is required for data.kind: "
                                "corpus")
        docs = read_documents(dcfg["corpus"], format=dcfg.get("format"), text_key=dcfg.get("text_key") or "text",
                              id_key=dcfg.get("id_key") or "id", data_dir=dcfg.get("data_dir"))
        data, ids = _chunked(docs, tokenizer, dcfg)
    n = len(ids)
    split = dcfg.get("split", "train")
    if split != "all":
        n_test = int(round(float(dcfg.get("test_fraction") or 0.0) * n))
        if split == "test" and n_test == 0:
            raise _config_error("data.split test needs data.test_fraction > 0 (the last fraction of the chunks)")
        sl = slice(n - n_test, n) if split == "test" else slice(0, n - n_test)
        data, ids = {k: v[sl] for k, v in data.items()}, ids[sl]
    if dcfg.get("limit") is not None:
        data, ids = {k: v[: int(dcfg["limit"])] for k, v in data.items()}, ids[: int(dcfg["limit"])]
    info = {"block_len": int(data["tokens"].shape[1])} if "tokens" in data else {}
    return data, ids, info


def _chunked(docs, tokenizer, dcfg):
    if tokenizer is None:
        raise _config_error("a text corpus needs a tokenizer: the model (model.kind: smollm2, or a model.factory "
                            "returning (model, tokenizer)) gives none")
    return chunk_documents(docs, tokenizer, int(dcfg.get("block_len") or 128), dcfg.get("stride"),
                           bool(dcfg.get("add_bos")))
