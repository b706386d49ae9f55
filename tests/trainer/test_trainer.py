"""LoRA-around-SAE training on a tiny model: it learns, resumes exactly, touches only LoRA weights."""

import json

import pytest
import torch

from saelora.adapters.bundle import load_bundle
from saelora.adapters.hooks import HookPoint
from saelora.adapters.models import load_model
from saelora.adapters.saes import load_sae
from saelora.trainer.config import TrainConfig
from saelora.trainer import evaluate as evaluate_mod
from saelora.trainer.evaluate import adapter_is_identity, bootstrap_interval, evaluate, gap_closed
from saelora.trainer.lora import LoraSettings, add_lora
from saelora.trainer.objective import ce_per_token, kl_per_token, prefix, teacher_logits
from saelora.trainer.train import train_lora
from tiny import tiny_workspace


@pytest.fixture
def ws(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELORA_CACHE", str(tmp_path / "cache"))
    return tiny_workspace(tmp_path)


def _cfg(ws, out, layers="all", **kw):
    base = dict(model=ws["model"], saes=ws["saes"], corpus=[ws["corpus"]], out=str(out),
                lora=LoraSettings(rank=8, alpha=16, layers=layers), lr=3e-3, max_steps=30, batch_size=4, seq_len=32,
                eval_interval=0, eval_rows=8, device="cpu", checkpoint_interval=0)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("layers", ["all", "after"])
def test_lora_steps_reduce_kl_and_close_the_gap(ws, tmp_path, layers):
    bundle, final = train_lora(_cfg(ws, tmp_path / "run", layers=layers))
    evals = [json.loads(ln)["eval"] for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "eval" in ln]
    first, last = evals[0], evals[-1]
    assert first["ce_adapted"] == pytest.approx(first["ce_spliced"])  # LoRA B starts at zero
    assert last["kl_adapted"] < first["kl_adapted"] * 0.9
    assert last["ce_adapted"] < first["ce_adapted"] and last["gap_closed"] > 0.2
    m = load_bundle(bundle).manifest
    assert m.training["steps"] == 30 and m.training["tokens_seen"] == 30 * 4 * 32
    assert m.metrics["final"]["gap_closed"] == pytest.approx(last["gap_closed"])
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lora"]["layers"] == layers


def test_same_seed_same_loss_curve(ws, tmp_path):
    def curve(out):
        train_lora(_cfg(ws, out, max_steps=8))
        return [json.loads(ln)["kl"] for ln in (out / "metrics.jsonl").read_text().splitlines() if '"kl"' in ln
                and "eval" not in ln]
    assert curve(tmp_path / "a") == curve(tmp_path / "b")


def test_resume_equals_uninterrupted(ws, tmp_path):
    full_bundle, _ = train_lora(_cfg(ws, tmp_path / "full", max_steps=10))
    train_lora(_cfg(ws, tmp_path / "split", max_steps=5))
    resumed_bundle, _ = train_lora(_cfg(ws, tmp_path / "split", max_steps=10, resume=True))
    from safetensors.torch import load_file

    a = load_file(full_bundle / "adapter_model.safetensors")
    b = load_file(resumed_bundle / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    kl = [[json.loads(ln)["kl"] for ln in (p / "metrics.jsonl").read_text().splitlines() if '"kl"' in ln and
           "eval" not in ln] for p in (tmp_path / "full", tmp_path / "split")]
    assert kl[0] == kl[1]


def test_only_lora_parameters_change(ws, tmp_path):
    lm = load_model(ws["model"], device="cpu")
    sae = load_sae(lm.model, ws["saes"][0])
    base_before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    sae_before = {k: v.clone() for k, v in sae.sae.state_dict().items()}
    bundle, _ = train_lora(_cfg(ws, tmp_path / "run", max_steps=5))
    lm2 = load_model(ws["model"], device="cpu")  # the training run's own model copy was adapted in place
    sae2 = load_sae(lm2.model, ws["saes"][0])
    assert all(torch.equal(base_before[k], v) for k, v in lm2.model.state_dict().items())
    assert all(torch.equal(sae_before[k], v) for k, v in sae2.sae.state_dict().items())
    assert lm2.fingerprint == lm.fingerprint
    from safetensors.torch import load_file

    lora = load_file(bundle / "adapter_model.safetensors")
    assert lora and all("lora_" in k for k in lora)
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)


def test_only_lora_parameters_are_trainable(ws):
    lm = load_model(ws["model"], device="cpu")
    sae = load_sae(lm.model, ws["saes"][0])
    lm.model.requires_grad_(False)
    peft = add_lora(lm.model, LoraSettings(rank=4), [sae.hook])
    trainable = [n for n, p in peft.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any(p.requires_grad for p in sae.sae.parameters())


@pytest.mark.parametrize("layers", ["all", "after"])
def test_a_fresh_adapter_is_copied_not_run_and_the_copy_equals_running_it(ws, monkeypatch, layers):
    """Invariant: the step-0 shortcut (an adapter whose B matrices are all zero adds nothing) gives bit for bit
    what running the adapter gives, and an adapter that changes anything is always run."""
    lm = load_model(ws["model"], device="cpu")
    sae = load_sae(lm.model, ws["saes"][0])
    lm.model.requires_grad_(False)
    peft = add_lora(lm.model, LoraSettings(rank=4, layers=layers), [sae.hook])
    rows = torch.randint(3, 40, (4, 16), generator=torch.Generator().manual_seed(0))
    assert adapter_is_identity(peft)
    copied = evaluate(peft, [sae], rows, batch_size=2).to_json()
    monkeypatch.setattr(evaluate_mod, "adapter_is_identity", lambda model: False)
    assert evaluate(peft, [sae], rows, batch_size=2).to_json() == copied
    assert copied["ce_adapted"] == copied["ce_spliced"] and copied["kl_adapter_only"] == 0.0
    with torch.no_grad(), peft.disable_adapter():  # base and spliced share the prefix: base is still the base model
        full = ce_per_token(peft(input_ids=rows).logits, rows)
    assert copied["ce_base"] == pytest.approx(float(full.mean()), rel=1e-6)
    monkeypatch.undo()
    with torch.no_grad():
        next(p for n, p in peft.named_parameters() if ".lora_B." in n)[0, 0] = 1e-3
    assert not adapter_is_identity(peft)
    assert not adapter_is_identity(torch.nn.Linear(2, 2))  # no adapter at all: nothing to copy from


@pytest.mark.parametrize("shared", [False, True])
def test_teacher_logits_equal_base_model_exactly(ws, shared):
    lm = load_model(ws["model"], device="cpu")
    sae = load_sae(lm.model, ws["saes"][0])
    ids = torch.randint(3, 40, (2, 16))
    with torch.no_grad():
        base = lm.model(ids).logits
    peft = add_lora(lm.model, LoraSettings(rank=4, layers="after"), [sae.hook])
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # an adapter that really changes the student
    point = sae.hook if shared else None
    t = teacher_logits(peft, ids, point, prefix(peft, point, ids))
    assert torch.equal(t, base)
    with torch.no_grad():
        assert not torch.allclose(peft(ids).logits, base, atol=1e-3)


def test_two_saes_trained_together(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELORA_CACHE", str(tmp_path / "cache"))
    ws = tiny_workspace(tmp_path, saes=(("topk", "blocks.0.hook_resid_post"), ("standard", "blocks.2.hook_resid_pre")))
    bundle, final = train_lora(_cfg(ws, tmp_path / "run", layers="after"))
    m = load_bundle(bundle).manifest
    assert [s["hook"] for s in m.saes] == ["blocks.0.hook_resid_post", "blocks.2.hook_resid_pre"]
    assert set(final["saes"]) == {"blocks.0.hook_resid_post", "blocks.2.hook_resid_pre"}
    assert final["kl_adapted"] < final["kl_spliced"]


def test_gap_formula():
    assert gap_closed(ce_base=2.0, ce_spliced=3.0, ce_adapted=2.5) == pytest.approx(0.5)
    assert gap_closed(2.0, 3.0, 3.0) == 0.0
    assert gap_closed(2.0, 3.0, 2.0) == 1.0
    assert gap_closed(2.0, 2.4, 2.1) == pytest.approx(0.75)


def test_bootstrap_interval_resamples_rows_in_pairs():
    """Invariants: the interval holds the point estimate, is reproducible by seed, is empty when every row agrees,
    narrows with more rows, and keeps each row's keys together (a paired statistic of identical keys is 0)."""
    gen = torch.Generator().manual_seed(0)
    base = (2 + torch.rand(64, generator=gen)).tolist()
    spliced = [b + 1 + 0.5 * float(torch.rand(1, generator=gen)) for b in base]
    adapted = [s - 0.4 for s in spliced]
    rows = {"ce_base": base, "ce_spliced": spliced, "ce_adapted": adapted}
    stat = lambda m: gap_closed(m["ce_base"], m["ce_spliced"], m["ce_adapted"])  # noqa: E731
    lo, hi = bootstrap_interval(rows, stat)
    point = stat({k: sum(v) / len(v) for k, v in rows.items()})
    assert lo < point < hi and hi - lo < 0.1
    assert bootstrap_interval(rows, stat) == [lo, hi] and bootstrap_interval(rows, stat, seed=1) != [lo, hi]
    assert bootstrap_interval({"a": [1.0] * 8}, lambda m: m["a"]) == [1.0, 1.0]
    assert bootstrap_interval({"a": base, "b": base}, lambda m: m["a"] - m["b"]) == [0.0, 0.0]
    few = bootstrap_interval({k: v[:8] for k, v in rows.items()}, stat)
    assert few[1] - few[0] > hi - lo


def test_kl_is_zero_for_equal_logits_and_positive_otherwise():
    a = torch.randn(2, 3, 11)
    assert kl_per_token(a, a).abs().max() < 1e-6
    assert (kl_per_token(a, a + torch.randn(2, 3, 11)) > 0).all()


def test_bad_configs(ws, tmp_path):
    with pytest.raises(ValueError, match="budget"):
        train_lora(_cfg(ws, tmp_path / "x", max_steps=None))
    with pytest.raises(ValueError, match="schedule"):
        train_lora(_cfg(ws, tmp_path / "x", schedule="exp"))
    with pytest.raises(ValueError, match="at least one SAE"):
        train_lora(_cfg(ws, tmp_path / "x", saes=[]))


def test_after_mode_shares_the_prefix(ws, tmp_path):
    from saelora.trainer.setup import shared_prefix_point

    lm = load_model(ws["model"], device="cpu")
    sae = load_sae(lm.model, ws["saes"][0])
    assert shared_prefix_point(lm.model, [sae], [2]) == HookPoint(1, "post")
    assert shared_prefix_point(lm.model, [sae], None) is None
    assert shared_prefix_point(lm.model, [sae], [1, 2]) is None


def test_ctrl_c_leaves_a_resumable_checkpoint(ws, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "saelora", "train", "--model", ws["model"], "--sae", ws["saes"][0], "--corpus",
            ws["corpus"], "--out", str(out), "--rank", "4", "--seq-len", "32", "--eval-rows", "4", "--lr", "3e-3",
            "--device", "cpu", "--checkpoint-interval", "0"]
    # SIGINT back to its default in the child: a parent started without job control (a background CI job)
    # passes SIGINT on as ignored, and Python then never raises KeyboardInterrupt.
    proc = subprocess.Popen(args + ["--max-steps", "100000"], env=dict(os.environ), stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = out / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and (not metrics.is_file() or metrics.read_text().count('"kl"') < 4):
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "--resume" in err
    assert (out / "checkpoint" / "state.pt").is_file()
    steps_done = sum(1 for ln in metrics.read_text().splitlines() if '"kl"' in ln and "eval" not in ln)
    r = subprocess.run(args + ["--max-steps", str(steps_done + 2), "--resume"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = [json.loads(ln) for ln in metrics.read_text().splitlines() if '"kl"' in ln and "eval" not in ln]
    assert [ln["step"] for ln in lines] == list(range(1, steps_done + 3))
