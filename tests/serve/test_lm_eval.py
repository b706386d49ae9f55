"""lm-eval-harness through the server: the real `lm_eval` package (`local-completions`) against live servers on
127.0.0.1, on both engines, for the base model, an adapter, the spliced model and a steered preset, each by
its model name (serve/api/names.py). Two small tasks shipped in tests/data/lm_eval (no network): a multiple
choice task (loglikelihood requests: echo, logprobs) and a generate-until task.

Invariants: every loglikelihood lm-eval records equals a direct forward pass of that model on the same tokens
(tests/serve/direct.py), and so does its greedy flag; a generation equals the server's own completion of the
same prompt by the explicit request."""

import json
from pathlib import Path

import httpx
import pytest

from direct import STEER, Direct

pytestmark = pytest.mark.integration
DATA = Path(__file__).resolve().parent.parent / "data" / "lm_eval"
NAMES = ["tiny", "a1", "tiny+sae", "tiny+sae:t-lmeval"]
TOL = 2e-3


def _tasks(folder: Path) -> None:
    """The two task configs, pointing at the shipped data files."""
    import yaml

    common = {"dataset_path": "json", "test_split": "test", "target_delimiter": " "}
    mc = {"task": "saelora_mc", "dataset_kwargs": {"data_files": {"test": str(DATA / "mc.jsonl")}},
          "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
          "doc_to_target": "label", "metric_list": [{"metric": "acc"}], **common}
    gen = {"task": "saelora_gen", "dataset_kwargs": {"data_files": {"test": str(DATA / "gen.jsonl")}},
           "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{target}}",
           "generation_kwargs": {"until": ["\n"], "max_gen_toks": 4, "do_sample": False},
           "metric_list": [{"metric": "exact_match"}], **common}
    for task in (mc, gen):
        (folder / f"{task['task']}.yaml").write_text(yaml.safe_dump(task))


def _run(server, name: str, ws: dict, tasks: Path) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    args = {"model": name, "base_url": server.url + "/v1/completions", "tokenizer": ws["model"],
            "tokenizer_backend": "huggingface", "tokenized_requests": True, "max_length": 64, "num_concurrent": 1,
            "max_retries": 1}
    return lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["saelora_mc", "saelora_gen"],
                                   task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
                                   batch_size=1)


@pytest.fixture(scope="module")
def direct(ws):
    return Direct(ws)


def test_lm_eval_scores_through_the_server_equal_direct_forwards(server, ws, direct, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _tasks(tmp_path)
    tok = AutoTokenizer.from_pretrained(ws["model"])
    assert httpx.put(server.url + "/v1/steering/presets/t-lmeval", json={"edits": [STEER]}).status_code == 200
    try:
        for name in NAMES:
            out = _run(server, name, ws, tmp_path)
            mc = out["samples"]["saelora_mc"]
            assert len(mc) == len((DATA / "mc.jsonl").read_text().splitlines())
            for sample in mc:  # arguments: (context, continuation) per choice; filtered_resps: (ll, greedy)
                for (ctx, cont), (got_ll, got_greedy) in zip(sample["arguments"], sample["filtered_resps"],
                                                             strict=True):
                    c_ids, whole = tok(ctx)["input_ids"], tok(ctx + cont)["input_ids"]
                    want_ll, want_greedy = direct.loglikelihood(name, c_ids, whole[len(c_ids):])
                    assert got_ll == pytest.approx(want_ll, abs=TOL) and got_greedy == want_greedy, (name, ctx, cont)
            for sample in out["samples"]["saelora_gen"]:
                explicit = httpx.post(server.url + "/v1/completions", json={
                    "model": name, "prompt": sample["doc"]["prompt"], "max_tokens": 4, "temperature": 0,
                    "stop": ["\n"]}, timeout=60).json()["choices"][0]["text"]
                assert sample["resps"][0][0] == explicit, (name, sample["doc"])
            assert 0.0 <= out["results"]["saelora_mc"]["acc,none"] <= 1.0
    finally:
        httpx.delete(server.url + "/v1/steering/presets/t-lmeval")


def test_the_shipped_tasks_are_well_formed():
    for f in ("mc.jsonl", "gen.jsonl"):
        rows = [json.loads(line) for line in (DATA / f).read_text().splitlines()]
        assert rows and all(set(r) in ({"context", "choices", "label"}, {"prompt", "target"}) for r in rows)
