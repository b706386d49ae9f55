"""Does the adapter keep the model's general abilities? The paper checks MMLU, HellaSwag and TruthfulQA with
lm-eval-harness; this machine cannot fetch them, so this runs the same harness, through `saelora serve`, on a
local task built from held-out text: given a document's opening (its first 48 tokens), pick its true
continuation (the next 16 tokens) among four, the other three taken from other documents of the same genre
(HellaSwag's shape). Documents come from the demo's test band (the hash band no recipe was chosen on) of each
genre of the mixture, 60 items per genre.

Four model names of one server (docs/evaluation.md): the base model, the base spliced (`+sae`), the demo adapter
alone, and the adapter spliced (`demo+sae`). Scores: lm-eval's `acc` and `acc_norm` with their standard errors,
per genre and overall.

    python bench/capabilities.py      # after `make demo`; writes bench/results/capabilities.{json,md}
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2-135m"
NAMES = [MODEL, MODEL + "+sae", "demo", "demo+sae"]
log = logging.getLogger("bench.capabilities")


def items(genre: str, n: int, tok, seed: int = 0) -> list[dict]:  # noqa: ANN001
    """n continuation items from `genre`'s test band (the demo adapter's bands: 3% validation, 7% test)."""
    from saelora.adapters.corpus import CorpusConfig, iter_documents, split_of

    bands = CorpusConfig(val_fraction=0.03, test_fraction=0.07)
    docs = []
    for doc in iter_documents(genre):
        if split_of(doc, bands) == "test":
            ids = tok(doc, add_special_tokens=False)["input_ids"]
            if len(ids) >= 64:
                docs.append((tok.decode(ids[:48]), tok.decode(ids[48:64])))
        if len(docs) >= 4 * n:
            break
    rng = random.Random(seed)
    rng.shuffle(docs)
    out = []
    for i, (context, ending) in enumerate(docs[:n]):
        others = [e for j, (_, e) in enumerate(docs) if j != i]
        choices = [ending, *rng.sample(others, 3)]
        rng.shuffle(choices)
        out.append({"genre": genre, "context": context, "choices": choices, "label": choices.index(ending)})
    return out


def task_files(folder: Path, data: list[dict]) -> None:
    import yaml

    (folder / "data.jsonl").write_text("".join(json.dumps(d) + "\n" for d in data))
    (folder / "saelora_continuation.yaml").write_text(yaml.safe_dump({
        "task": "saelora_continuation", "dataset_path": "json", "test_split": "test",
        "dataset_kwargs": {"data_files": {"test": str(folder / "data.jsonl")}}, "output_type": "multiple_choice",
        "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}", "doc_to_target": "label",
        "target_delimiter": "", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}))


def evaluate(url: str, name: str, tokenizer: str, folder: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = {"model": name, "base_url": url + "/v1/completions", "tokenizer": tokenizer, "tokenized_requests": True,
            "max_length": 256, "num_concurrent": 4, "max_retries": 1}
    out = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["saelora_continuation"],
                                  task_manager=TaskManager(include_path=str(folder)), log_samples=True)
    return out


def summary(out: dict) -> dict:
    import statistics

    samples = out["samples"]["saelora_continuation"]
    by: dict[str, list[tuple[float, float]]] = {}
    for s in samples:
        by.setdefault(s["doc"]["genre"], []).append((s["acc"], s["acc_norm"]))
    res = {g: {"acc": statistics.mean(a for a, _ in v), "acc_norm": statistics.mean(b for _, b in v), "n": len(v)}
           for g, v in sorted(by.items())}
    r = out["results"]["saelora_continuation"]
    res["all"] = {"acc": r["acc,none"], "acc_stderr": r["acc_stderr,none"], "acc_norm": r["acc_norm,none"],
                  "acc_norm_stderr": r["acc_norm_stderr,none"], "n": len(samples)}
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-genre", type=int, default=60)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from saelora.adapters.config import demo_dir
    from saelora.adapters.genres import GENRE_NAMES
    from saelora.adapters.models import embedded_model_dir
    from saelora.launch import ServeProcess
    from transformers import AutoTokenizer

    tok_dir = str(embedded_model_dir(MODEL))
    tok = AutoTokenizer.from_pretrained(tok_dir)
    folder = Path(tempfile.mkdtemp(prefix="saelora-cap-"))
    data = [it for g in GENRE_NAMES for it in items(g, args.per_genre, tok)]
    task_files(folder, data)
    work = demo_dir(MODEL)
    srv = ServeProcess(["--model", MODEL, "--sae", str(work / "sae"), "--adapter", f"demo={work / 'adapter'}",
                        "--adapter-root", str(work)]).start()
    try:
        res = {name: summary(evaluate(srv.url, name, tok_dir, folder)) for name in NAMES}
    finally:
        srv.close()
    (RESULTS / "capabilities.json").write_text(json.dumps({"items": len(data), "per_genre": args.per_genre,
                                                           "results": res}, indent=1))
    genres = [g for g in res[NAMES[0]] if g != "all"]
    lines = ["# Capabilities through the server: a held-out continuation task (lm-eval-harness, local-completions)",
             "", f"{len(data)} items ({args.per_genre} per genre), 4 choices (chance 25%); the demo's test band. "
             "Rerun: `python bench/capabilities.py`.", "",
             "| model name | acc (all) | acc_norm (all) | " + " | ".join(f"acc {g}" for g in genres) + " |",
             "|---|---|---|" + "---|" * len(genres)]
    for name in NAMES:
        a = res[name]["all"]
        lines.append(f"| `{name}` | {a['acc']:.3f} ± {a['acc_stderr']:.3f} | {a['acc_norm']:.3f} ± "
                     f"{a['acc_norm_stderr']:.3f} | " + " | ".join(f"{res[name][g]['acc']:.3f}" for g in genres) + " |")
    (RESULTS / "capabilities.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
