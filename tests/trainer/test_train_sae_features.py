"""train-sae on a known sparse dictionary, features on a planted latent, the e2e baseline, the CLI."""

import json
import subprocess
import sys

import pytest
import torch

from saelora.adapters.models import load_model
from saelora.adapters.saes import load_sae, read_sae
from saelora.trainer.config import TrainConfig
from saelora.trainer.e2e import train_e2e
from saelora.trainer.features import FeaturesConfig, describe_features, write_features
from saelora.trainer.train_sae import SAETrainConfig, fit_sae, sae_quality, save_inference
from tiny import make_sae, save_sae, tiny_workspace

FVU_BOUND = 0.1  # topk, d_sae 96, k 4 on 3-sparse data from 48 atoms: ~0.04 measured


def test_train_sae_recovers_a_known_sparse_dictionary(tmp_path):
    g = torch.Generator().manual_seed(0)
    d, m, k = 32, 48, 3
    atoms = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=-1)

    def sample(n):
        idx = torch.rand(n, m, generator=g).argsort(-1)[:, :k]
        return torch.zeros(n, m).scatter_(1, idx, 1 + 2 * torch.rand(n, k, generator=g)) @ atoms

    def provider():
        while True:
            yield sample(256)

    cfg = SAETrainConfig(architecture="topk", d_sae=96, k=4, tokens=256 * 1500, batch_tokens=256, lr=3e-3)
    trained = fit_sae(provider(), d, cfg, {"hook_name": "blocks.0.hook_resid_post", "model_name": "synthetic"})
    sae = save_inference(trained, tmp_path / "sae", {"corpus": "synthetic"})
    q = sae_quality(sae, sample(4000))
    assert q["fvu"] < FVU_BOUND and q["l0"] == 4.0
    loaded, _ = read_sae(str(tmp_path / "sae"))
    meta = json.loads((tmp_path / "sae" / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.0.hook_resid_post" and meta["corpus"] == "synthetic"
    cos = torch.nn.functional.normalize(loaded.W_dec, dim=-1) @ atoms.T  # (d_sae, m)
    assert cos.max(0).values.mean() > 0.9, "most true atoms have a matching decoder row"


def test_train_sae_on_a_model(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELORA_CACHE", str(tmp_path / "cache"))
    ws = tiny_workspace(tmp_path)
    from saelora.trainer.train_sae import train_sae

    cfg = SAETrainConfig(model=ws["model"], hook="blocks.1.hook_resid_post", d_sae=64, k=4, tokens=80_000, lr=3e-3,
                         batch_tokens=256, seq_len=32, model_batch=8, corpus=[ws["corpus"]], val_tokens=2000, epochs=1,
                         out=str(tmp_path / "sae"), device="cpu")
    folder, q = train_sae(cfg)
    meta = json.loads((folder / "cfg.json").read_text())["metadata"]
    assert meta["hook_name"] == "blocks.1.hook_resid_post" and meta["context_size"] == 32
    assert {"fvu", "l0", "dead_latents"} <= set(meta) and 0 < q["fvu"] < 1 and q["l0"] == 4.0
    # the CE cost of splicing it is measured on held-out rows and recorded beside the FVU
    assert {"ce_base", "ce_spliced", "ce_cost"} <= set(meta) and 0 < q["ce_tokens"] <= 32 * 31  # up to 32 rows
    assert q["ce_cost"] == pytest.approx(q["ce_spliced"] - q["ce_base"]) and 0 < q["ce_base"] < 10
    lm = load_model(ws["model"], device="cpu")
    assert load_sae(lm.model, str(folder)).hook.name == "blocks.1.hook_resid_post"


def _planted_sae(lm, token_id: int, feature: int = 5):
    """A ReLU SAE on the embeddings (resid_pre of layer 0) whose latent `feature` fires only on `token_id`."""
    sae = make_sae("standard", hook="blocks.0.hook_resid_pre", d_sae=16)
    emb = lm.model.get_input_embeddings().weight.detach()  # (V, d)
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_enc.fill_(-1.0)
        sae.b_dec.zero_()
        sae.W_enc[:, feature] = emb[token_id] / emb[token_id].norm()
        others = (emb @ sae.W_enc[:, feature]).clone()
        others[token_id] = -float("inf")
        sae.b_enc[feature] = -(others.max() + (emb[token_id].norm() - others.max()) / 2)
        head = lm.model.get_output_embeddings().weight.detach()
        sae.W_dec[feature] = head[token_id] * 4 / head[token_id].norm()  # it writes `token_id` to the logits
    return sae


def test_features_name_the_planted_feature_contexts(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELORA_CACHE", str(tmp_path / "cache"))
    ws = tiny_workspace(tmp_path)
    lm = load_model(ws["model"], device="cpu")
    fox = lm.tokenizer.convert_tokens_to_ids("fox")
    folder = save_sae(_planted_sae(lm, fox), tmp_path / "planted")
    sae = load_sae(lm.model, str(folder))
    from saelora.adapters.corpus import CorpusConfig, load_corpus

    rows = load_corpus(lm.tokenizer, CorpusConfig((ws["corpus"],), seq_len=32)).train[:40]
    result = describe_features(lm.model, lm.tokenizer, sae, rows, FeaturesConfig(top_n=5))
    f5 = result["features"][5]
    assert len(f5["top"]) == 5 and all(c["token"] == "fox" for c in f5["top"])
    assert f5["density"] == pytest.approx((rows[:, 1:] == fox).float().mean().item())  # position 0 skipped
    assert set(result["dead"]) == set(range(16)) - {5}
    ctx = f5["top"][0]
    assert rows[ctx["row"], ctx["position"]] == fox
    out = write_features(result, tmp_path / "feat")
    page = (out / "index.html").read_text()
    assert "SAE features" in page and '"token": "fox"' in page
    assert json.loads((out / "features.json").read_text())["features"][5]["top"][0]["token"] == "fox"
    # what it writes: its decoder row is fox's unembedding, so fox is the token it promotes most
    assert f5["logits"]["promoted"][0]["token_id"] == fox and len(f5["logits"]["suppressed"]) == 10
    assert "promotes" in page


def test_e2e_baseline_improves_the_spliced_ce(tmp_path, monkeypatch):
    monkeypatch.setenv("SAELORA_CACHE", str(tmp_path / "cache"))
    ws = tiny_workspace(tmp_path)
    cfg = TrainConfig(model=ws["model"], saes=ws["saes"], corpus=[ws["corpus"]], out=str(tmp_path / "e2e"), lr=3e-3,
                      max_steps=30, batch_size=4, seq_len=32, eval_interval=0, eval_rows=8, device="cpu",
                      checkpoint_interval=0)
    folder, final = train_e2e(cfg)
    evals = [json.loads(ln)["eval"] for ln in (tmp_path / "e2e" / "metrics.jsonl").read_text().splitlines()
             if "eval" in ln]
    assert evals[-1]["kl_spliced"] < evals[0]["kl_spliced"] and evals[-1]["ce_spliced"] < evals[0]["ce_spliced"]
    lm = load_model(ws["model"], device="cpu")
    tuned = load_sae(lm.model, str(folder / "blocks.1.hook_resid_post"))
    original = load_sae(lm.model, ws["saes"][0])
    assert tuned.fingerprint["id"] != original.fingerprint["id"]
    assert lm.fingerprint["id"] == load_model(ws["model"], device="cpu").fingerprint["id"]


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "saelora", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def test_cli_train_then_eval_then_features(tmp_path):
    import os

    ws = tiny_workspace(tmp_path)
    env = dict(os.environ, SAELORA_CACHE=str(tmp_path / "cache"))
    r = _cli("train", "--model", ws["model"], "--sae", ws["saes"][0], "--corpus", ws["corpus"], "--out",
             str(tmp_path / "run"), "--rank", "4", "--max-steps", "6", "--seq-len", "32", "--eval-rows", "4",
             "--lr", "3e-3", "--device", "cpu", "--policy", "keep_first=0", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "gap_closed" in r.stdout and (tmp_path / "run" / "adapter" / "saelora.json").is_file()
    trained = json.loads((tmp_path / "run" / "adapter" / "saelora.json").read_text())["saes"][0]["policy"]
    assert trained["keep_first"] is False  # the override, recorded in the manifest
    # eval restores the SAE, its policy and the corpus (sources, row length) from the manifest
    r = _cli("eval", "--model", ws["model"], "--adapter", str(tmp_path / "run" / "adapter"), "--rows", "4",
             "--device", "cpu", "--held-out", ws["corpus"], env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "spliced at" in r.stdout and "position 0" not in r.stdout.split("spliced at")[1].splitlines()[0]
    out = json.loads((tmp_path / "run" / "adapter" / "eval.json").read_text())
    assert list(out["policies"].values()) == [trained]
    res = out["results"]["held-out"]
    assert {"ce_base", "ce_spliced", "ce_adapted", "gap_closed", "kl_adapted", "ce_adapter_only"} <= set(res)
    lo, hi = res["gap_closed_ci"]  # a bootstrap interval over the 4 rows, around the point estimate
    assert lo <= res["gap_closed"] <= hi and res["ce_cost_ci"][0] <= res["ce_spliced"] - res["ce_base"]
    # --held-out SOURCE: that source's own held-out band, one result; the training source's is the main one
    assert out["results"][f"{ws['corpus']} held-out"] == res
    r = _cli("features", "--model", ws["model"], "--sae", ws["saes"][0], "--corpus", ws["corpus"], "--rows", "8",
             "--seq-len", "32", "--out", str(tmp_path / "feat"), "--device", "cpu", env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "feat" / "index.html").is_file()


def test_cli_bad_input_is_a_clear_error(tmp_path):
    r = _cli("train", "--sae", str(tmp_path / "missing"), "--max-steps", "1")
    assert r.returncode != 0 and "not a sae-lens folder" in r.stderr
    assert "Traceback" not in r.stderr


def test_each_latents_histogram_counts_its_active_tokens_in_its_bins():
    """Invariant: a latent's histogram holds every one of its non-zero activations once, in the bin its value
    falls in (HIST_EDGES: [E[j-1], E[j])), and nothing else."""
    import torch

    from saelora.trainer.features import HIST_EDGES, TopContexts

    g = torch.Generator().manual_seed(0)
    z = torch.rand(3, 7, 5, generator=g) * 40
    z[z < 15] = 0  # sparse, as latents are
    z[0, 0, 1] = HIST_EDGES[3]  # on an edge: the bin that starts there
    acc = TopContexts(5, top_n=2)
    acc.update(z[:2], 0)
    acc.update(z[2:], 2)
    for j in range(5):
        vals = z[..., j][z[..., j] > 0]
        h = acc.histogram(j)
        assert sum(h["counts"]) == len(vals) == int(acc.active[j])
        want = torch.bincount(torch.bucketize(vals, torch.tensor(HIST_EDGES), right=True),
                              minlength=len(HIST_EDGES) + 1).tolist()
        assert want[h["lo"]:h["lo"] + len(h["counts"])] == h["counts"] and sum(want) == sum(h["counts"])
    assert acc.histogram(1)["counts"][3 - acc.histogram(1)["lo"] + 1] >= 1  # E[3] counts in bin 4: [E[3], E[4])
