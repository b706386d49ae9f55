"""GPU readiness check (run by bench/gpu_smoke.sh): the saelora path on CUDA in bf16, against the same run on
the CPU in fp32, on one machine.

1. train a LoRA adapter for a few steps around a frozen SAE (model bf16 on CUDA, SAE fp32) and eval it;
2. serve model + SAE + adapter with the torch engine (`saelora serve --device cuda`), ask /v1/features for
   per-token latents, and compare them with the same request to a CPU fp32 server: top-k latent sets must
   overlap (mean Jaccard >= 0.8) and shared latents' values agree (median relative difference <= 5%);
3. write bench/results/gpu_smoke.json.

The model: `--model` (default: the embedded smollm2-135m when its package or cached copy is here). The GPU
machines this project borrows reach no package registry and take at most 64 MiB of files, and the embedded
GGUF alone is 94 MiB; there the script builds a random model of SmolLM2-135M's exact shape (same config, random
weights, seed 0) with the test suite's tiny tokenizer and corpus, so the CUDA code path is what is checked,
not the embedded model's quality. The SAE is a random top-k SAE at layer 12 (seed 0).

    python bench/gpu_smoke.py [--device cuda] [--steps 4] [--model PATH | --stand-in]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
log = logging.getLogger("gpu_smoke")

# SmolLM2-135M-Instruct's architecture (its config.json), for the random stand-in.
SMOL_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
                  tie_word_embeddings=True, vocab_size=49152)
SAE_LAYER = 12


def stand_in_workspace(root: Path, model: str | None) -> dict:
    """The model folder (or spec), an SAE at layer 12 and a corpus."""
    import json as js

    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny import make_sae, save_sae, tiny_text_corpus, tiny_tokenizer

    docs = tiny_text_corpus(n_docs=400)
    (root / "corpus.jsonl").write_text("\n".join(js.dumps({"text": d}) for d in docs))
    sae = str(save_sae(make_sae("topk", hook=f"blocks.{SAE_LAYER}.hook_resid_post", d_in=576, d_sae=2048,
                                seed=0),
                       root / "sae"))
    if model is None:
        tok = tiny_tokenizer(docs)
        torch.manual_seed(0)
        cfg = LlamaConfig(**SMOL_SHAPE, bos_token_id=None, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        LlamaForCausalLM(cfg).save_pretrained(root / "model")
        tok.save_pretrained(root / "model")
        model = str(root / "model")
    return {"model": model, "sae": sae, "corpus": str(root / "corpus.jsonl")}


def embedded_available() -> bool:
    from saelora.adapters.models import embedded_gguf_path, embedded_model_dir

    try:
        embedded_model_dir("smollm2-135m") if embedded_gguf_path("smollm2-135m") else None
        return True
    except Exception as e:  # noqa: BLE001  (any reason it cannot load: use the stand-in)
        log.warning("embedded model not available here (%s): using a random SmolLM2-shaped stand-in", e)
        return False


def train(ws: dict, out: Path, device: str, steps: int) -> dict:
    from saelora.trainer.config import TrainConfig
    from saelora.trainer.lora import LoraSettings
    from saelora.trainer.train import train_lora

    cfg = TrainConfig(model=ws["model"], saes=[ws["sae"]], corpus=[ws["corpus"]], out=str(out),
                      lora=LoraSettings(rank=16, layers="all"), lr=1e-3, max_steps=steps, batch_size=4,
                      seq_len=128, eval_interval=0, eval_rows=8, device=device, checkpoint_interval=0)
    t0 = time.perf_counter()
    bundle, final = train_lora(cfg)
    return {"bundle": str(bundle), "final_eval": final, "wall_s": round(time.perf_counter() - t0, 1)}


def features(ws: dict, bundle: str, device: str, prompt: str, top_k: int) -> list[dict]:
    from saelora.launch import ServeProcess

    args = ["--model", ws["model"], "--sae", ws["sae"], "--adapter", f"smoke={bundle}", "--device", device,
            "--served-model-name", "smoke"]
    with ServeProcess(args, timeout=600) as srv:
        r = httpx.post(srv.url + "/v1/features", json={"model": "smoke", "input": prompt, "top_k": top_k},
                       timeout=300)
        r.raise_for_status()
        return r.json()["tokens"]


def compare(gpu: list[dict], cpu: list[dict]) -> dict:
    """Per token and SAE: Jaccard of the top-k latent ids, and relative differences of the shared latents'
    values."""
    jac, rel = [], []
    for g, c in zip(gpu, cpu, strict=True):
        for gs, cs in zip(g["features"], c["features"], strict=True):
            gi = dict(zip(gs["indices"], gs["values"], strict=True))
            ci = dict(zip(cs["indices"], cs["values"], strict=True))
            if not gi and not ci:
                continue
            jac.append(len(gi.keys() & ci.keys()) / len(gi.keys() | ci.keys()))
            rel += [abs(gi[i] - ci[i]) / max(abs(ci[i]), 1e-6) for i in gi.keys() & ci.keys()]
    return {"tokens": len(jac), "jaccard_mean": statistics.fmean(jac) if jac else float("nan"),
            "value_rel_diff_median": statistics.median(rel) if rel else float("nan")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--model", help="model spec or folder (default: smollm2-135m if here, else the stand-in)")
    p.add_argument("--stand-in", action="store_true", help="use the random SmolLM2-shaped model even when the "
                   "embedded one is here")
    p.add_argument("--work", default=str(ROOT / "runs" / "gpu_smoke"))
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "gpu_smoke.json"))
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        log.error("no CUDA device: run with --device cpu for a dry run of the script itself")
        return 2
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = a.model or (None if a.stand_in or not embedded_available() else "smollm2-135m")
    ws = stand_in_workspace(work, model)
    res: dict = {"device": a.device, "torch": torch.__version__, "model": model or "random SmolLM2-135M shape",
                 "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    res["train"] = train(ws, work / "run", a.device, a.steps)
    prompt = "The capital of France is Paris, and the river that runs through it is the Seine."
    gpu = features(ws, res["train"]["bundle"], a.device, prompt, top_k=8)
    cpu = features(ws, res["train"]["bundle"], "cpu", prompt, top_k=8)
    res["latents_vs_cpu"] = cmp = compare(gpu, cpu)
    res["pass"] = bool(cmp["jaccard_mean"] >= 0.8 and cmp["value_rel_diff_median"] <= 0.05
                       and res["train"]["final_eval"]["ce_adapted"] == res["train"]["final_eval"]["ce_adapted"])
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2, default=str))
    log.info("%s: %s", "PASS" if res["pass"] else "FAIL", json.dumps(cmp))
    return 0 if res["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
