"""Corpus reading, document-level split, seeded shuffling and packing."""

import json

import pytest
import torch

from saelora.adapters.corpus import CorpusConfig, CorpusError, is_validation, iter_documents, load_corpus, pack
from tiny import tiny_tokenizer

DOCS = [f"document {i} talks about topic {i % 7} with words alpha beta gamma {'delta ' * (i % 5)}".strip()
        for i in range(200)]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELORA_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def jsonl(tmp_path):
    p = tmp_path / "docs.jsonl"
    p.write_text("\n".join(json.dumps({"text": d}) for d in DOCS) + "\n")
    return p


@pytest.fixture
def tok():
    return tiny_tokenizer(DOCS)


def _docs_of(rows, tok):
    """Split packed rows back into documents at EOS (the first and last pieces may be partial)."""
    flat = rows.flatten().tolist()
    eos, docs, cur = tok.eos_token_id, [], []
    for t in flat:
        if t == eos:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    return docs


def test_pack_with_eos_separators():
    rows = pack([[5, 6, 7], [8, 9]], eos_id=2, seq_len=4)
    assert rows.tolist() == [[5, 6, 7, 2]]  # the partial row [8, 9, 2] is dropped
    rows = pack([[5, 6, 7], [8, 9, 10, 11]], eos_id=2, seq_len=3)
    assert rows.tolist() == [[5, 6, 7], [2, 8, 9], [10, 11, 2]]
    assert rows.dtype == torch.int64


def test_split_is_by_document_and_deterministic(jsonl, tok):
    cfg = CorpusConfig(sources=(str(jsonl),), seq_len=16, val_fraction=0.2, seed=0)
    c = load_corpus(tok, cfg, use_cache=False)
    val_docs = {d for d in DOCS if is_validation(d, 0.2)}
    assert 10 < len(val_docs) < 70
    assert c.info["val_docs"] == len(val_docs) and c.info["train_docs"] == 200 - len(val_docs)
    train_seen = set(_docs_of(c.train, tok)[1:])  # whole documents found between EOS tokens
    val_seen = set(_docs_of(c.val, tok)[1:])
    norm = {tok.decode(tok(d, add_special_tokens=False)["input_ids"]): d for d in DOCS}
    assert train_seen and val_seen
    assert all(norm[d] not in val_docs for d in train_seen)
    assert all(norm[d] in val_docs for d in val_seen)
    again = load_corpus(tok, cfg, use_cache=False)
    assert torch.equal(c.train, again.train) and torch.equal(c.val, again.val)


def test_bands_nest_and_the_reserve_band_never_trains(jsonl, tok):
    """Invariant: test < validation < reserve by hash, each document in exactly one band; adding a reserve band
    moves documents out of train only (test and validation hold the same documents), and survives the cache."""
    from saelora.adapters.corpus import doc_hash

    base = CorpusConfig(sources=(str(jsonl),), seq_len=16, test_fraction=0.1, val_fraction=0.1)
    cfg = CorpusConfig(sources=(str(jsonl),), seq_len=16, test_fraction=0.1, val_fraction=0.1, reserve_fraction=0.2)
    a, b = load_corpus(tok, base), load_corpus(tok, cfg)
    reserve = {d for d in DOCS if 0.2 <= doc_hash(d) < 0.4}
    assert reserve and b.info["reserve_docs"] == len(reserve) and a.info["reserve_docs"] == 0
    norm = {tok.decode(tok(d, add_special_tokens=False)["input_ids"]): d for d in DOCS}
    for split, lo, hi in (("test", 0.0, 0.1), ("val", 0.1, 0.2)):
        assert a.info[f"{split}_docs"] == b.info[f"{split}_docs"]
        assert all(lo <= doc_hash(norm[d]) < hi for d in set(_docs_of(getattr(b, split), tok)[1:]))
    assert b.info["train_docs"] == a.info["train_docs"] - len(reserve)
    assert all(norm[d] not in reserve for d in set(_docs_of(b.train, tok)[1:]))
    assert all(norm[d] in reserve for d in set(_docs_of(b.reserve, tok)[1:]))
    assert torch.equal(load_corpus(tok, cfg).reserve, b.reserve)  # from the cache
    for bad in ({"reserve_fraction": -0.1}, {"val_fraction": 1.0}, {"test_fraction": 0.5, "reserve_fraction": 0.5}):
        with pytest.raises(CorpusError, match="held-out bands"):
            load_corpus(tok, CorpusConfig(sources=(str(jsonl),), seq_len=16, **bad))


def test_seed_shuffles(jsonl, tok):
    a = load_corpus(tok, CorpusConfig(sources=(str(jsonl),), seq_len=16, seed=0), use_cache=False)
    b = load_corpus(tok, CorpusConfig(sources=(str(jsonl),), seq_len=16, seed=1), use_cache=False)
    assert not torch.equal(a.train, b.train)
    assert a.info["train_docs"] == b.info["train_docs"]  # same split, different order


def test_cache_returns_the_same(jsonl, tok, tmp_path):
    cfg = CorpusConfig(sources=(str(jsonl),), seq_len=16)
    a = load_corpus(tok, cfg)
    assert list((tmp_path / "cache" / "corpus").glob("*.npz"))
    b = load_corpus(tok, cfg)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val) and a.info == b.info


def test_txt_and_folder_sources(tmp_path, tok):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("first paragraph here\n\nsecond paragraph\n\n\n")
    (tmp_path / "d" / "b.md").write_text("third one")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00")
    assert list(iter_documents(str(tmp_path / "d"))) == ["first paragraph here", "second paragraph", "third one"]
    assert list(iter_documents(str(tmp_path / "d" / "a.txt"))) == ["first paragraph here", "second paragraph"]


def test_bad_sources(tmp_path, tok):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(CorpusError, match="bad.jsonl:2"):
        list(iter_documents(str(bad)))
    with pytest.raises(CorpusError, match="no such file or folder"):
        iter_documents(str(tmp_path / "missing"))
    with pytest.raises(CorpusError, match="offline"):
        list(iter_documents("hf:wikitext"))
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CorpusError, match="unsupported file type"):
        iter_documents(str(tmp_path / "x.csv"))


def test_embedded_wikipedia_documents():
    docs = list(iter_documents("wiki"))
    assert len(docs) > 9000
    assert docs[0].startswith("0 is a number")  # sorted by article title
