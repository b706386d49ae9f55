"""The broad corpus's genres: readers, the cap, fetching (a real .deb built here instead of apt-get download),
and the `tech` / `narrative` / `mix` corpus sources."""

import json
import shutil
import subprocess

import pytest

from saelora.adapters import genres
from saelora.adapters.corpus import CorpusConfig, iter_documents, load_corpus
from tiny import tiny_tokenizer

RST = """Sorting HOW TO
**************

.. _sortinghowto:

Python lists have a built-in :meth:`list.sort` method that modifies the list in-place.
There is also a :func:`sorted` built-in function that builds a new sorted list from an iterable.

Sorting Basics
==============

A simple ascending sort is very easy: just call the :func:`sorted` function.

.. index:: pair: sorting; key
"""
FORTUNES = "A fool and his money are soon partying.\n%\nShort one.\n%\n" \
           "In the beginning God created the heaven and the earth. -- Genesis 1:1\n%\n" \
           "\"Are you sure?\" she asked. \"Never,\" said the captain, and sailed on.\n"


def test_rst_sections_are_documents_without_directives():
    docs = list(genres.read_rst(RST))
    assert len(docs) == 2 and docs[0].startswith("Sorting HOW TO") and docs[1].startswith("Sorting Basics")
    assert not any(".. _" in d or ".. index::" in d for d in docs)


def test_fortunes_are_cookies_of_five_words_or_more_and_scripture_stays_out():
    docs = list(genres.read_fortunes(FORTUNES))
    assert docs == ["A fool and his money are soon partying.",
                    "\"Are you sure?\" she asked. \"Never,\" said the captain, and sailed on."]


def test_long_sections_are_cut_into_runs_of_paragraphs():
    text = "\n\n".join(f"paragraph {i} " + "word " * 100 for i in range(7))
    runs = list(genres.read_plain(text))
    assert len(runs) == 3 and all(len(r.split()) >= 300 for r in runs[:2]) and "paragraph 6" in runs[-1]


def test_cap_is_deterministic_distinct_and_bounded():
    docs = [f"doc {i} " * (i % 5 + 1) for i in range(100)] * 2
    a, b = genres.capped(iter(docs), 500), genres.capped(iter(reversed(docs)), 500)
    assert a == b and len(set(a)) == len(a) and sum(map(len, a)) <= 500


def _fake_download(tmp_path):
    """Stands in for `apt-get download`: builds a real .deb (dpkg-deb --build) holding the package's files."""
    files = {"fortunes": ("usr/share/games/fortunes/people", FORTUNES),
             "python3.11-doc": ("usr/share/doc/python3.11/html/_sources/howto/sorting.rst.txt", RST),
             "debian-reference-en": ("usr/share/debian-reference/debian-reference.en.txt.gz", None)}

    def download(pkg, into):
        root = tmp_path / "build" / pkg
        rel, text = files[pkg]
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if text is None:
            import gzip
            (root / rel).write_bytes(gzip.compress(b"The apt tool installs packages and their dependencies.\n\n"
                                                   b"Use apt-get update before apt-get install to refresh lists."))
        else:
            (root / rel).write_text(text)
        (root / "DEBIAN").mkdir(exist_ok=True)
        (root / "DEBIAN" / "control").write_text(f"Package: {pkg}\nVersion: 1.0\nArchitecture: all\n"
                                                 "Maintainer: t <t@t>\nDescription: test\n")
        deb = into / f"{pkg}_1.0_all.deb"
        subprocess.run(["dpkg-deb", "--build", str(root), str(deb)], check=True, capture_output=True)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(into / pkg)], check=True)
        return deb
    return download


@pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="needs dpkg-deb")
def test_fetch_extracts_each_genre_and_records_its_packages(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(genres, "_download", _fake_download(tmp_path))
    with pytest.raises(genres.GenreError, match="saelora corpus-fetch"):
        genres.genre_file("tech")
    manifest = genres.fetch()
    assert manifest["narrative"]["documents"] == 2 and manifest["tech"]["documents"] == 3
    python_doc = manifest["tech"]["packages"][0]
    assert python_doc["licence"] == "PSF-2.0" and len(python_doc["sha256"]) == 64
    assert json.loads((genres.genres_dir() / "manifest.json").read_text()) == manifest
    narrative = list(iter_documents("narrative"))
    assert narrative == sorted(narrative, key=lambda d: genres.hashlib.sha256(b"cap:" + d.encode()).digest())
    mix = list(iter_documents("mix"))
    assert set(narrative) <= set(mix) and set(iter_documents("tech")) <= set(mix) and len(mix) > 100  # wiki too
    tok = tiny_tokenizer(narrative + list(iter_documents("tech")))
    corpus = load_corpus(tok, CorpusConfig(sources=("tech", "narrative"), seq_len=8, val_fraction=0.0))
    assert corpus.info["train_docs"] == 5
    with pytest.raises(genres.GenreError, match="no genre 'poetry'"):
        genres.fetch(("poetry",))
    # fetched genres are kept as they are (make setup runs corpus-fetch every time); refresh downloads again
    calls = []
    monkeypatch.setattr(genres, "_download", lambda pkg, into: calls.append(pkg) or _fake_download(tmp_path)(pkg, into))
    assert genres.fetch() == manifest and calls == []
    genres.fetch(("narrative",), refresh=True)
    assert calls == ["fortunes"]
