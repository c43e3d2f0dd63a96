"""The LLM workflow of the command line end to end on a tiny model named by an import path:
``jaxval log`` (a jsonl corpus in chunks of the model's tokens) -> ``jaxval fit`` -> ``jaxval attribute``
(greedy generation, top proponents / opponents, per-token parts, attribution.html), and the page's content
checked without a browser."""

import html.parser
import json
import os

import numpy as np
import pytest
import yaml

from flax import nnx

from jaxval.cli import app
from jaxval.cli import config as C
from jaxval.data import corpus
from jaxval.models import gpt

HERE = os.path.dirname(__file__)
DOCS = [{"id": "cats", "text": "the cat sat on the mat. the cat ate the rat. a cat is a small animal."},
        {"id": "dogs", "text": "the dog ran in the park. a dog barks at the mailman every morning."},
        {"id": "sea", "text": "waves roll on the sea; ships sail over the grey water to the harbour."},
        {"id": "math", "text": "two plus two is four, and three times three is nine."}]



def tiny_gpt(block_size: int = 48, d_model: int = 16, n_layer: int = 1, n_head: int = 2, seed: int = 0):
    """The model factory the configs name (``model.factory: test_llm_cli:tiny_gpt``): ``(GPT over UTF-8
    bytes, ByteTokenizer())``."""
    cfg = gpt.GPTConfig(vocab_size=256, block_size=block_size, d_model=d_model, n_layer=n_layer, n_head=n_head)
    return gpt.GPT(cfg, rngs=nnx.Rngs(seed)), corpus.ByteTokenizer()


def documents(n: int = 4):
    """A data factory: ``n`` short documents as (id, text) pairs."""
    return [(f"doc{i}", f"document {i}: the cat sat on the mat {i} times.") for i in range(n)]

@pytest.fixture
def workflow(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(HERE)     # the factories' module: this file (tiny_gpt, documents below)
    with open(tmp_path / "docs.jsonl", "w") as f:
        for d in DOCS:
            f.write(json.dumps(d) + "\n")
    cfg = {"name": "tiny_llm", "seed": 0,
           "model": {"factory": "test_llm_cli:tiny_gpt", "args": {"block_size": 48}},
           "data": {"kind": "corpus", "corpus": str(tmp_path / "docs.jsonl"), "block_len": 24, "stride": 16},
           "logra": {"rank": 4},
           "log": {"output": str(tmp_path / "out" / "train.store"), "dtype": "float32", "batch_size": 8},
           "fit": {"kind": "ekfac"}}
    path = tmp_path / "tiny_llm.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, tmp_path


class _Page(html.parser.HTMLParser):
    """Cards and their token spans (text, data-part) of attribution.html; external references."""

    def __init__(self):
        super().__init__()
        self.cards, self.external, self._tok, self.text = [], [], None, []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("src", "href"):
            if a.get(key) and "://" in a[key]:
                self.external.append(a[key])
        if tag == "div" and "card" in (a.get("class") or "").split():
            self.cards.append({"class": a["class"], "blocks": []})
        if tag == "div" and a.get("class") == "text" and self.cards:
            self.cards[-1]["blocks"].append([])
        if tag == "span" and "tok" in (a.get("class") or "").split():
            self._tok = [float(a["data-part"]), ""]

    def handle_endtag(self, tag):
        if tag == "span" and self._tok is not None:
            if self.cards and self.cards[-1]["blocks"]:
                self.cards[-1]["blocks"][-1].append(tuple(self._tok))
            self._tok = None

    def handle_data(self, data):
        self.text.append(data)
        if self._tok is not None:
            self._tok[1] += data


def test_llm_workflow_end_to_end(workflow):
    path, tmp = workflow
    # the corpus: every document in chunks of 24 bytes every 16, tails padded and masked
    cfg = C.load_config(path)
    data, ids, _ = C.build_data(cfg["data"], model_cfg=cfg["model"])
    text_bytes = {d["id"]: d["text"].encode() for d in DOCS}
    for row, cid in enumerate(ids):
        doc, k = str(cid).split(":")
        want = text_bytes[doc][16 * int(k): 16 * int(k) + 24]
        got = bytes(data["tokens"][row][data["mask"][row] > 0].tolist())
        assert got == want
    assert app.main(["log", "--config", str(path), "--no-progress", "--stats", "kfac"]) == 0
    assert app.main(["fit", "--config", str(path), "--no-progress"]) == 0
    out = tmp / "attr"
    assert app.main(["attribute", "--config", str(path), "--prompt", "the cat", "--max-new-tokens", "8",
                     "--top-k", "3", "--highlight", "2", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "attribution.json").read_text())
    assert res["prompt"] == "the cat" and res["precond_kind"] == "ekfac" and res["n_train"] == len(ids)
    q = res["query"]
    assert bytes(q["ids"][: len("the cat")]) == b"the cat" and sum(q["target"]) == 8
    assert bytes(q["ids"]).decode("utf-8", errors="replace") == "the cat" + res["generation"]
    assert len(q["tokens"]) == len(q["ids"]) and "".join(q["tokens"][:7]) == "the cat"

    # the top-k are the best / worst cosines in the EK-FAC metric over every stored row (numpy here)
    import jaxval as jv
    store = jv.GradientStore.open(cfg["log"]["output"])
    pc = jv.Preconditioner.load(cfg["fit"]["output"])
    cfg_m = dict(cfg, model=dict(cfg["model"], checkpoint=app.model_path(cfg["log"]["output"])))
    model, _, _, _, logra = C.prepare(cfg_m, progress=False)
    qb = {"tokens": np.asarray([q["ids"]], np.int32), "mask": np.asarray([q["target"]], np.float32)}
    gq = np.asarray(logra.grads(model, qb), np.float64)
    g = np.asarray(store.read(0, len(store)), np.float64)
    hq, hg = np.asarray(pc.apply(gq.astype(np.float32)), np.float64), np.asarray(pc.apply(g.astype(np.float32)), np.float64)
    cos = (hq @ g.T)[0] / np.sqrt((hq * gq).sum() * (hg * g).sum(1))
    order = np.argsort(-cos)
    store_ids = [str(i) for i in store.ids]
    pro, opp = res["proponents"], res["opponents"]
    assert [e["id"] for e in pro] == [store_ids[i] for i in order[:3]]
    assert [e["id"] for e in opp] == [store_ids[i] for i in order[::-1][:3]]
    np.testing.assert_allclose([e["score_store"] for e in pro], cos[order[:3]], rtol=1e-3, atol=1e-5)
    assert len(pro) == len(opp) == 3
    assert [e["score_store"] for e in pro] == sorted([e["score_store"] for e in pro], reverse=True)
    assert [e["score_store"] for e in opp] == sorted([e["score_store"] for e in opp])
    assert pro[0]["score_store"] >= opp[0]["score_store"]
    for e in pro[:2] + opp[:2]:
        # exact split: the token parts sum to the recomputed score, which is the store's (float32 store)
        assert abs(sum(e["parts"]) - e["score"]) <= 1e-4 * max(1.0, abs(e["score"]))
        assert abs(sum(e["query_parts"]) - e["score"]) <= 1e-4 * max(1.0, abs(e["score"]))
        assert abs(e["score"] - e["score_store"]) <= 1e-3 * max(1.0, abs(e["score"]))
        # the query's prompt tokens are context: no part
        assert all(p == 0 for p, t in zip(e["query_parts"], q["target"]) if not t)
        assert "".join(e["tokens"]) == e["text"]
    assert pro[2]["parts"] is None and opp[2]["parts"] is None

    # the page: self-contained, every highlighted example's tokens in order with their parts
    page_src = (out / "attribution.html").read_text()
    page = _Page()
    page.feed(page_src)
    assert page.external == [] and "<script" not in page_src
    text = "".join(page.text)
    assert "the cat" in text and "Top proponents" in text and "Top opponents" in text
    cards = page.cards
    assert len(cards) == 6 and [c["class"] for c in cards] == ["card pro"] * 3 + ["card opp"] * 3
    for card, e in zip(cards, pro + opp):
        if e["parts"] is None:
            assert card["blocks"] == [[]]   # a plain text block
            continue
        train_block, query_block = card["blocks"]
        assert [t for _, t in train_block] == [t.replace("\n", "⏎") for t in e["tokens"]]
        np.testing.assert_allclose([p for p, _ in train_block], e["parts"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose([p for p, _ in query_block], e["query_parts"], rtol=1e-5, atol=1e-7)
        assert str(e["id"]) in text
    assert (out / "report.md").read_text().count("| 1 |") == 2


def test_factory_errors_are_config_errors(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(HERE)
    base = {"data": {"factory": "test_llm_cli:documents", "args": {"n": 3}, "block_len": 16},
            "log": {"output": str(tmp_path / "s")}}
    cfg = C.normalize_config(dict(base, model={"factory": "test_llm_cli:tiny_gpt"}))
    data, ids, _ = C.build_data(cfg["data"], model_cfg=cfg["model"])
    assert list(ids) == ["doc0:0", "doc0:1", "doc0:2", "doc1:0", "doc1:1", "doc1:2", "doc2:0", "doc2:1", "doc2:2"]
    for bad, msg in (("no_such_module_xyz:f", "cannot import"), ("test_llm_cli:nope", "no attribute"),
                     ("test_llm_cli", "pkg.module:function")):
        with pytest.raises(C.ConfigError, match=msg):
            C.prepare(C.normalize_config(dict(base, model={"factory": bad})), progress=False)
    with pytest.raises(C.ConfigError, match="model.kind"):
        C.normalize_config(dict(base, model={"train": {"steps": 1}}))
    with pytest.raises(C.ConfigError, match="data.kind"):
        C.normalize_config(dict(base, data={"block_len": 8}, model={"kind": "gpt"}))


def test_jsonl_and_plain_text_documents(tmp_path):
    (tmp_path / "a.txt").write_text("hello world")
    assert corpus.read_documents(tmp_path / "a.txt") == [("a", "hello world")]
    (tmp_path / "b.jsonl").write_text('{"id": 7, "text": "x"}\n\n{"text": "y"}\n')
    assert corpus.read_documents(tmp_path / "b.jsonl") == [("7", "x"), ("2", "y")]
    (tmp_path / "c.jsonl").write_text('{"id": 1, "text": "x"}\n{"id": 1, "text": "y"}\n')
    with pytest.raises(C.ConfigError, match="not unique"):
        corpus.read_documents(tmp_path / "c.jsonl")
    data, ids = corpus.chunk_documents([("d", "abcdefghij")], corpus.ByteTokenizer(), 4, stride=3)
    assert list(ids) == ["d:0", "d:1", "d:2"]
    assert [bytes(t[m > 0].tolist()) for t, m in zip(data["tokens"], data["mask"])] == [b"abcd", b"defg", b"ghij"]
