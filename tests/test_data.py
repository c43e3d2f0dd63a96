"""Tests of the jaxval.data loaders (numpy only)."""

import gzip
import os
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from jaxval.data import ENV_VAR, data_dir
from jaxval.data.digits import load_digits
from jaxval.data.idx import load_idx_dataset, read_idx
from jaxval.data.text import CharTokenizer, WordTokenizer, load_text, make_blocks


def _real_data_dir():
    for cand in (os.environ.get(ENV_VAR), Path(__file__).resolve().parents[1] / ".." / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


# ---------------------------------------------------------------------------------- data_dir


def test_data_dir_resolution_order(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f.txt").write_text("x")
    monkeypatch.setenv(ENV_VAR, str(b))
    assert data_dir(a) == a.resolve()                      # argument first
    assert data_dir() == b.resolve()                       # then the environment variable
    monkeypatch.delenv(ENV_VAR)
    work = tmp_path / "proj" / "main"
    work.mkdir(parents=True)
    default = tmp_path / "proj" / "shared" / "data"
    default.mkdir(parents=True)
    monkeypatch.chdir(work)
    assert data_dir() == default.resolve()                 # then ../shared/data from the cwd
    assert data_dir(a, expect=["f.txt"]) == a.resolve()


def test_data_dir_errors_name_files_and_env(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=ENV_VAR):
        data_dir(expect=["mnist/train-images-idx3-ubyte.gz"])
    with pytest.raises(FileNotFoundError, match="mnist/train-images-idx3-ubyte.gz"):
        data_dir(expect=["mnist/train-images-idx3-ubyte.gz"])
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=ENV_VAR):
        data_dir()
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tinyshakespeare/input.txt.*" + ENV_VAR):
        data_dir(expect=["tinyshakespeare/input.txt"])
    with pytest.raises(FileNotFoundError, match="tinyshakespeare"):
        load_text("tinyshakespeare")


# ---------------------------------------------------------------------------------- digits


def test_load_digits():
    from sklearn.datasets import load_digits as sk

    ref = sk()
    d = load_digits(test_fraction=0.2, seed=0)
    assert d["x_train"].dtype == np.float32 and d["y_train"].dtype == np.int32
    assert d["x_train"].shape[1] == 64 and d["images_train"].shape[1:] == (8, 8)
    assert d["x_train"].shape[0] + d["x_test"].shape[0] == 1797
    assert d["x_test"].shape[0] == round(0.2 * 1797)
    assert 0.0 <= d["x_train"].min() and d["x_train"].max() <= 1.0 and d["x_train"].max() == 1.0
    idx = np.concatenate([d["idx_train"], d["idx_test"]])
    np.testing.assert_array_equal(np.sort(idx), np.arange(1797))
    np.testing.assert_allclose(d["x_test"], ref.data[d["idx_test"]] / 16.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(d["y_train"], ref.target[d["idx_train"]])
    np.testing.assert_array_equal(d["images_train"].reshape(-1, 64), d["x_train"])
    again = load_digits(test_fraction=0.2, seed=0)
    np.testing.assert_array_equal(again["idx_test"], d["idx_test"])
    other = load_digits(test_fraction=0.2, seed=1)
    assert not np.array_equal(other["idx_test"], d["idx_test"])


# ---------------------------------------------------------------------------------- IDX


def _write_idx(path, arr, code, gz=True):
    head = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape)
    big = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    payload = head + arr.astype(big).tobytes()
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(payload)


def _tiny_idx_folder(folder, n_train=5, n_test=3, h=3, w=4, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        img = rng.integers(0, 256, size=(n, h, w), dtype=np.uint8)
        lab = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", img, 0x08)
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", lab, 0x08)
        data[split] = (img, lab)
    return data


def test_read_idx_formats(tmp_path):
    img = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", img, 0x08)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), img)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz", limit=1), img[:1])
    i16 = np.array([[-300, 2], [7, 32000]], dtype=np.int16)
    _write_idx(tmp_path / "b", i16, 0x0B, gz=False)
    out = read_idx(tmp_path / "b")
    assert out.dtype == np.int16 and out.dtype.isnative
    np.testing.assert_array_equal(out, i16)
    f32 = np.array([1.5, -2.25, 3e10], dtype=np.float32)
    _write_idx(tmp_path / "c.gz", f32, 0x0D)
    np.testing.assert_array_equal(read_idx(tmp_path / "c.gz"), f32)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(ValueError, match="not an IDX"):
        read_idx(tmp_path / "bad")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + b"\x00" * 4)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "short.gz")


def test_load_idx_dataset_tiny(tmp_path, monkeypatch):
    ref = _tiny_idx_folder(tmp_path / "root" / "mnist")
    d = load_idx_dataset("mnist", data_dir=tmp_path / "root")
    assert d["x_train"].shape == (5, 12) and d["x_train"].dtype == np.float32
    np.testing.assert_array_equal(d["x_train"], ref["train"][0].reshape(5, 12).astype(np.float32) / 255)
    np.testing.assert_array_equal(d["x_test"], ref["t10k"][0].reshape(3, 12).astype(np.float32) / 255)
    assert d["y_train"].dtype == np.int32
    np.testing.assert_array_equal(d["y_test"], ref["t10k"][1])
    # the dataset folder itself, no flattening, a limit; and via the environment variable
    d2 = load_idx_dataset("mnist", data_dir=tmp_path / "root" / "mnist", flatten=False, limit=2)
    assert d2["x_train"].shape == (2, 3, 4) and d2["y_test"].shape == (2,)
    np.testing.assert_array_equal(d2["x_train"], ref["train"][0][:2] / np.float32(255))
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "root"))
    np.testing.assert_array_equal(load_idx_dataset("mnist")["y_train"], ref["train"][1])
    with pytest.raises(FileNotFoundError, match="fashion-mnist/train-images-idx3-ubyte.gz"):
        load_idx_dataset("fashion-mnist")
    with pytest.raises(ValueError, match="unknown"):
        load_idx_dataset("cifar10")


@pytest.mark.skipif(_real_data_dir() is None or not (_real_data_dir() / "mnist").is_dir(),
                    reason="real MNIST files not present")
def test_real_idx_files():
    root = _real_data_dir()
    img = read_idx(root / "mnist" / "train-images-idx3-ubyte.gz")
    assert img.shape == (60000, 28, 28) and img.dtype == np.uint8
    for name in ("mnist", "fashion-mnist"):
        if not (root / name).is_dir():
            continue
        d = load_idx_dataset(name, data_dir=root, limit=100)
        assert d["x_train"].shape == (100, 784) and d["x_test"].shape == (100, 784)
        assert 0.0 <= d["x_train"].min() and d["x_train"].max() <= 1.0
        assert set(np.unique(d["y_train"])) <= set(range(10))
    np.testing.assert_array_equal(load_idx_dataset("mnist", data_dir=root, limit=100)["x_train"],
                                  img[:100].reshape(100, 784) / np.float32(255))


# ---------------------------------------------------------------------------------- text


def test_load_text_names_and_paths(tmp_path):
    root = tmp_path / "data"
    (root / "tinyshakespeare").mkdir(parents=True)
    (root / "wikitext-2").mkdir()
    (root / "tinyshakespeare" / "input.txt").write_text("First Citizen:\nBefore we proceed", encoding="utf-8")
    (root / "wikitext-2" / "valid.txt").write_text(" = Valid = \n", encoding="utf-8")
    (root / "wikitext-2" / "test.txt").write_text(" = Test = \n", encoding="utf-8")
    assert load_text("tinyshakespeare", data_dir=root).startswith("First Citizen")
    assert load_text("wikitext-2-valid", data_dir=root) == " = Valid = \n"
    assert load_text("wikitext-2-test", data_dir=root) == " = Test = \n"
    p = tmp_path / "mine.txt"
    p.write_text("héllo", encoding="utf-8")
    assert load_text(p) == "héllo" and load_text(str(p)) == "héllo"
    with pytest.raises(FileNotFoundError, match="neither"):
        load_text("no-such-corpus")


def test_char_tokenizer():
    text = "hello, wörld!\nhi"
    tok = CharTokenizer.from_text(text)
    assert tok.vocab == sorted(set(text)) and tok.vocab_size == len(set(text))
    ids = tok.encode(text)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, [tok.vocab.index(c) for c in text])
    assert tok.decode(ids) == text
    assert tok.decode([]) == "" and tok.encode("").shape == (0,)
    with pytest.raises(ValueError, match="not in the vocab"):
        tok.encode("xyz")
    t2 = CharTokenizer(["b", "a", "?"], unk="?")         # any order; unknown -> unk
    np.testing.assert_array_equal(t2.encode("abz"), [1, 0, 2])
    assert t2.decode([0, 1, 2]) == "ba?"


def test_word_tokenizer():
    text = "the cat sat on the mat\nthe dog sat <unk> here\n"
    words = text.split()
    tok = WordTokenizer.from_text(text, vocab_size=5)
    counts = Counter(w for w in words if w != "<unk>")
    top = sorted(counts, key=lambda w: (-counts[w], words.index(w)))[:4]
    assert tok.vocab == ["<unk>"] + top == ["<unk>", "the", "sat", "cat", "on"]
    ref = [tok.vocab.index(w) if w in tok.vocab else 0 for w in words]
    np.testing.assert_array_equal(tok.encode(text), ref)
    assert tok.decode(tok.encode("the cat sat")) == "the cat sat"
    assert tok.decode(tok.encode("the zebra")) == "the <unk>"
    full = WordTokenizer.from_text(text, eos="<eos>")
    assert full.vocab[:2] == ["<unk>", "<eos>"] and len(full) == 2 + len(set(words) - {"<unk>"})
    ids = full.encode(text)
    assert ids.shape == (len(words) + 2,)
    assert full.decode(ids) == text
    with pytest.raises(ValueError):
        WordTokenizer(["a", "b"])                          # no unk in vocab


@pytest.mark.parametrize("n,block_len,stride", [(20, 5, None), (23, 5, None), (23, 6, 2), (10, 10, 3),
                                                (17, 4, 7)])
def test_make_blocks_matches_loop(n, block_len, stride):
    ids = np.random.default_rng(n).integers(0, 50, size=n)
    out = make_blocks(ids, block_len, stride)
    s = block_len if stride is None else stride
    ref = []
    i = 0
    while i + block_len <= n:
        ref.append(ids[i:i + block_len])
        i += s
    ref = np.array(ref, dtype=np.int32)
    assert out["tokens"].dtype == np.int32 and out["tokens"].flags.c_contiguous
    np.testing.assert_array_equal(out["tokens"], ref)
    np.testing.assert_array_equal(out["mask"], np.ones_like(ref, dtype=np.float32))


def test_make_blocks_errors_and_char_pipeline():
    with pytest.raises(ValueError, match="at least"):
        make_blocks(np.arange(3), 4)
    with pytest.raises(ValueError):
        make_blocks(np.arange(10), 0)
    text = "abcabcabcabc"
    tok = CharTokenizer.from_text(text)
    b = make_blocks(tok.encode(text), 4)
    assert [tok.decode(r) for r in b["tokens"]] == ["abca", "bcab", "cabc"]
