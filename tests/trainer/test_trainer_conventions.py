"""The trainer's conventions (issue 31): `--config FILE` under the flags, the Hugging Face flag names as aliases,
`--train-tokens` (the old `--max-tokens` still works, with a warning), and `--report-to tensorboard|trackio`
logging exactly the scalars of metrics.jsonl, each read back with the real library."""

import json
import logging

import pytest

from saelora.cli import parse
from saelora.adapters.errors import ConfigError
from saelora.adapters.options import config_from_args
from saelora.trainer.config import TrainConfig
from saelora.trainer.lora import LoraSettings
from saelora.trainer.train import train_lora
from tiny import tiny_workspace


def _train_config(argv):
    return config_from_args(TrainConfig, parse(["train", *argv]))


def test_a_config_file_sets_defaults_and_flags_override_it(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("learning-rate: 0.5\nmax_steps: 7\nlora:\n  rank: 8\n  target_modules: [q_proj, v_proj]\n"
                 "report_to: tensorboard\nsae: [a, b]\n")
    cfg = _train_config(["--config", str(f), "--lr", "0.1"])
    assert (cfg.lr, cfg.max_steps, cfg.lora.rank, cfg.lora.targets) == (0.1, 7, 8, ["q_proj", "v_proj"])
    assert cfg.report_to == "tensorboard" and cfg.saes == ["a", "b"]
    j = tmp_path / "run.json"
    j.write_text(json.dumps({"lr": 0.25, "out": "somewhere"}))
    cfg = _train_config(["--config", str(j), "--output-dir", "elsewhere"])
    assert (cfg.lr, cfg.out) == (0.25, "elsewhere")


@pytest.mark.parametrize("content,message", [("nope: 1\n", "unknown option 'nope'"), ("- 1\n", "a mapping")])
def test_a_bad_config_file_is_a_clear_error(tmp_path, content, message):
    f = tmp_path / "bad.yaml"
    f.write_text(content)
    with pytest.raises(ConfigError, match=message):
        parse(["train", "--config", str(f)])
    with pytest.raises(ConfigError, match="no such file"):
        parse(["train", "--config", str(tmp_path / "missing.yaml")])


def test_hugging_face_names_and_the_renamed_budget(caplog):
    cfg = _train_config(["--learning-rate", "0.2", "--max-grad-norm", "0.5", "--lora-alpha", "4",
                         "--target-modules", "q_proj", "--train-tokens", "1000"])
    assert (cfg.lr, cfg.clip, cfg.lora.alpha, cfg.lora.targets, cfg.max_tokens) == (0.2, 0.5, 4.0, ["q_proj"], 1000)
    with caplog.at_level(logging.WARNING):
        assert _train_config(["--max-tokens", "500"]).max_tokens == 500
    assert "--max-tokens is deprecated: use --train-tokens" in caplog.text


def test_report_to_an_unknown_tracker_is_refused():
    with pytest.raises(SystemExit):
        parse(["train", "--report-to", "wandb"])  # argparse's choices: a usage error


def _rows(out):
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def _expected(rows):
    from saelora.trainer.tracking import scalars

    want: dict[str, dict[int, float]] = {}
    for row in rows:
        for k, v in scalars(row).items():
            want.setdefault(k, {})[row["step"]] = v
    return want


def _read_back(tracker, out):
    """The scalars a tracker stored for the run in `out`, read with the real library: {tag: {step: value}}."""
    if tracker == "tensorboard":
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(out / "tensorboard"))
        acc.Reload()
        return {k: {e.step: e.value for e in acc.Scalars(k)} for k in acc.Tags()["scalars"]}
    from trackio.sqlite_storage import SQLiteStorage

    got: dict[str, dict[int, float]] = {}
    for row in SQLiteStorage.get_logs(project="saelora", run=out.name):
        for k, v in row.items():
            if k.startswith(("train/", "eval/")):
                got.setdefault(k, {})[row["step"]] = v
    return got


@pytest.mark.parametrize("tracker", ["tensorboard", "trackio"])
def test_report_to_logs_the_scalars_of_metrics_jsonl(tmp_path, monkeypatch, tracker):
    monkeypatch.setenv("SAELORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio-db"))
    ws = tiny_workspace(tmp_path)
    out = tmp_path / "run"
    train_lora(TrainConfig(model=ws["model"], saes=ws["saes"], corpus=[ws["corpus"]], out=str(out),
                           lora=LoraSettings(rank=4, alpha=8), lr=3e-3, max_steps=4, batch_size=2, seq_len=16,
                           eval_interval=2, eval_rows=4, device="cpu", checkpoint_interval=0, report_to=tracker))
    want = _expected(_rows(out))
    assert {"train/kl", "train/lr", "eval/ce_spliced"} <= want.keys()
    got = _read_back(tracker, out)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6), k  # float32 in event files


def test_train_sae_reports_sae_lens_step_scalars_to_metrics_jsonl_and_tensorboard(tmp_path, monkeypatch):
    """train-sae: every log_every steps, one metrics.jsonl row of sae-lens's step scalars; --report-to logs the
    same numbers at the same steps; a bad log_every or tracker is refused before any work."""
    from saelora.trainer.train_sae import SAETrainConfig, train_sae

    monkeypatch.setenv("SAELORA_CACHE", str(tmp_path / "cache"))
    ws = tiny_workspace(tmp_path)
    out = tmp_path / "sae"
    cfg = SAETrainConfig(model=ws["model"], hook="blocks.1.hook_resid_post", d_sae=64, k=4, tokens=8_000, lr=3e-3,
                         batch_tokens=256, seq_len=32, model_batch=8, corpus=[ws["corpus"]], val_tokens=500, epochs=1,
                         out=str(out), device="cpu", log_every=5, report_to="tensorboard", ce_rows=0,
                         checkpoints=[0.5])
    for bad in ({"log_every": 0}, {"report_to": "wandb"}, {"checkpoints": [1.5]}):
        with pytest.raises(ConfigError):
            train_sae(SAETrainConfig(**{**cfg.__dict__, **bad}))
    train_sae(cfg)
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(5, 5 * len(rows) + 1, 5)) and len(rows) >= 4
    assert {"overall_loss", "mse_loss", "l0", "explained_variance", "dead_features"} <= rows[0].keys()
    assert all(r["l0"] == pytest.approx(4.0) for r in rows)  # TopK, k 4
    want, got = _expected(rows), _read_back("tensorboard", out)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=1e-6), k
    # the checkpoint at half of training is a loadable SAE that records when it was taken
    from saelora.adapters.models import load_model
    from saelora.adapters.saes import load_sae

    meta = json.loads((out / "checkpoints" / "0.5" / "cfg.json").read_text())["metadata"]
    final = json.loads((out / "cfg.json").read_text())["metadata"]
    assert meta["checkpoint_step"] == round(final["train_activations"] // 256 / 2) and meta["fit_seconds"] > 0
    assert meta["hook_name"] == final["hook_name"] and meta["collect_seconds"] >= 0
    assert load_sae(load_model(ws["model"], device="cpu").model, str(out / "checkpoints" / "0.5")).sae.cfg.d_sae == 64
