"""`saelora steer-eval` end to end on the tiny model with a concept folder (fast tier): every method runs, the
rows carry what the report needs, the report chooses on development concepts only, and the embedded suite's
parts are disjoint and fixed by hash."""

import json

import pytest


def _suite(folder, rng_words):
    folder.mkdir()
    cats = [f"the cat {w} on the mat . a big cat sat ." for w in rng_words]
    sky = [f"sun rises east . moon {w} night day bright ." for w in rng_words]
    other = [f"the river flows to sea {w} ." for w in rng_words]
    (folder / "cats.txt").write_text("\n".join(cats))
    (folder / "sky.txt").write_text("\n".join(sky))
    (folder / "_negative.txt").write_text("\n".join(other))
    (folder / "_prompts.txt").write_text("the\na big\n")
    (folder / "_descriptions.json").write_text(json.dumps({"cats": "cats", "sky": "the sky"}))
    return folder


def test_steer_eval_runs_every_method_and_the_report_chooses_on_dev(tmp_path, monkeypatch):
    from saelora.trainer.features import FeaturesConfig, run_features
    from saelora.trainer.run_steer_eval import run_steer_eval
    from saelora.trainer.steer_eval import METHODS, SteerEvalConfig
    from saelora.trainer.steer_report import pareto_plot, summarise, table
    from tiny import WORDS, tiny_workspace

    ws = tiny_workspace(tmp_path)
    monkeypatch.setenv("SAELORA_CACHE", str(tmp_path / "cache"))
    run_features(FeaturesConfig(model=ws["model"], saes=ws["saes"], corpus=[ws["corpus"]], rows=16, seq_len=32))
    suite = _suite(tmp_path / "suite", WORDS * 2)
    cfg = SteerEvalConfig(model=ws["model"], sae=ws["saes"][0], suite=str(suite), samples=1, max_new=4,
                          search_texts=8, max_len=16, out=str(tmp_path / "out"))
    res = run_steer_eval(cfg)
    rows = res["rows"]
    assert {r["method"] for r in rows} == set(METHODS)
    assert {r["target"] for r in rows} == {"cats", "sky"}
    for r in rows:
        g = r["per_generation"]
        assert len(g["concept"]) == len(g["gap"]) == len(g["distinct2"]) == r["n"] == 2  # 2 prompts x 1 sample
        assert 0 <= r["success"] <= r["concept"] <= 1
    assert (tmp_path / "out" / "results.json").is_file()
    # the development concept alone chooses; the report covers the other one only
    summary = summarise(rows, dev=("cats",))
    assert summary["latent_add"]["concepts"] == ["sky"] and summary["latent_add"]["strength"] is not None
    assert "| auto |" in table(summary)
    fixed = summarise(rows, dev=(), fixed={"latent_add": 0.5})  # no development concept: another run's choice
    assert fixed["latent_add"]["strength"] == 0.5 and fixed["latent_add"]["concepts"] == ["cats", "sky"]
    pareto_plot({"tiny": rows}, str(tmp_path / "pareto.png"), dev=("cats",))
    assert (tmp_path / "pareto.png").stat().st_size > 1000


def test_embedded_suite_parts_are_disjoint_and_rule_based():
    from saelora.trainer.concepts import DEV_CONCEPTS, text_hash, wiki_suite

    suite = wiki_suite()
    assert len(suite.concepts) >= 6 and set(DEV_CONCEPTS) < set(suite.concepts)
    for c in suite.concepts:
        parts = [set(suite.texts(c, p)) for p in ("search", "judge", "test")]
        assert not (parts[0] & parts[1]) and not (parts[1] & parts[2]) and not (parts[0] & parts[2])
        assert all(text_hash(t) < 0.4 for t in parts[0]) and len(parts[2]) >= 10
    assert not set(suite.negatives) & {t for ts in suite.concepts.values() for t in ts}


@pytest.mark.parametrize("bad", [{"methods": ["telepathy"]}])
def test_steer_eval_refuses_unknown_methods(bad, tmp_path):
    from saelora.adapters.errors import ConfigError
    from saelora.trainer.run_steer_eval import run_steer_eval
    from saelora.trainer.steer_eval import SteerEvalConfig

    with pytest.raises(ConfigError):
        run_steer_eval(SteerEvalConfig(**bad))


def test_steer_eval_cli_reads_list_of_float_options_as_floats():
    """`--norm-grid` items are numbers (a list[float] field), comma-separated or repeated; list[str] stays text."""
    import argparse

    from saelora.adapters.options import add_dataclass_args, config_from_args
    from saelora.trainer.steer_eval import SteerEvalConfig

    p = argparse.ArgumentParser()
    add_dataclass_args(p, SteerEvalConfig)
    cfg = config_from_args(SteerEvalConfig, p.parse_args(["--norm-grid", "0.05,0.07", "--norm-grid", "0.093",
                                                          "--concepts", "food"]))
    assert cfg.norm_grid == [0.05, 0.07, 0.093] and cfg.concepts == ["food"]
