"""Study: how much of a frozen SAE's CE gap LoRA closes, and how fast, against the paper's baselines.

Setting (a scaled-down replica of Chen, Engels, Tegmark 2025; docs/training.md says what differs):
- the embedded model and its shipped TopK SAE (or --sae), spliced under the SAE's position policy;
- the corpus split by document hash into train, validation (learning-rate choice) and test (reported
  numbers, >= --eval-tokens tokens); the SAE was trained with a larger held-out band, so it saw neither;
- arms, each at an equal budget of optimizer steps (equal tokens; cosine decay to 0): LoRA on all layers
  (`lora_all`), LoRA on the layers after the SAE (`lora_after`), and KL fine-tuning of the SAE itself
  (`sae_kl`, Karvonen 2025);
- a learning-rate sweep per arm with seed 0 on the validation split, the chosen rate rerun with seed 1;
  reported: test CE of both seeds, their mean and spread;
- the paper's own comparison (`from_scratch`): an SAE trained from scratch end to end with KL against a
  TopK SAE trained from scratch with MSE followed by LoRA, counting total wall time (SAE + LoRA).
  speedup = e2e's time to its final validation CE / TopK+LoRA's time to the same CE.

    python bench/train_gap.py            # the full study, about 1.5-2 h on 2 idle CPU cores (run it in the background)
    python bench/train_gap.py --quick --model M --sae S --corpus C   # CI smoke run on the tiny model

Writes <out>/train_gap.{json,md,png} (train_gap_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_gap_report import plot, write_md  # noqa: E402

log = logging.getLogger("bench.train_gap")
RESULTS = Path(__file__).parent / "results"
ARMS = ("lora_all", "lora_after", "sae_kl")


def train_config(args: argparse.Namespace, arm: str, lr: float, seed: int, out: Path, sae: str, steps: int) -> Any:
    from saelora.trainer.config import LoraSettings, TrainConfig

    layers = "after" if arm in ("lora_after", "scratch_lora") else "all"
    return TrainConfig(model=args.model, saes=[sae], corpus=list(args.corpus), out=str(out),
                       lora=LoraSettings(rank=args.rank, layers=layers), lr=lr, seed=seed, max_steps=steps,
                       schedule=args.schedule,
                       warmup_steps=min(args.warmup_steps, steps // 4), eval_interval=max(1, steps // args.evals),
                       eval_rows=args.val_rows, batch_size=args.batch_size, seq_len=args.seq_len,
                       val_fraction=args.val_fraction, test_fraction=args.test_fraction, checkpoint_interval=0)


def run(args: argparse.Namespace, arm: str, lr: float, seed: int, work: Path, sae: str,
        steps: int | None = None) -> dict[str, Any]:
    """Train one arm for `steps` (default --run-steps); returns its record: config, validation curve
    (training seconds, CE), final validation CE, output paths."""
    from saelora.trainer.e2e import train_e2e
    from saelora.trainer.evaluate import gap_closed
    from saelora.trainer.train import train_lora

    steps = steps or args.run_steps
    out = work / f"{arm}-lr{lr:g}-s{seed}"
    cfg = train_config(args, arm, lr, seed, out, sae, steps)
    artifact = out / ("saes" if arm in ("sae_kl", "e2e_scratch") else "adapter")
    if args.reuse_runs and _finished(out, cfg):
        log.info("%s lr %g seed %d: reusing the finished run in %s", arm, lr, seed, out)
    else:
        log.info("%s lr %g seed %d for %d steps", arm, lr, seed, steps)
        artifact, _ = (train_e2e if arm in ("sae_kl", "e2e_scratch") else train_lora)(cfg)
    key = "ce_spliced" if arm in ("sae_kl", "e2e_scratch") else "ce_adapted"
    evals = [json.loads(ln)["eval"] for ln in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in ln]
    curve = [(e["train_s"], e[key]) for e in evals]
    ref = evals[0]["ce_spliced"]  # the SAE as given, before any training (sae_kl trains the SAE itself)
    gaps = [(e["train_s"], gap_closed(e["ce_base"], ref, e[key])) for e in evals]
    return {"arm": arm, "lr": lr, "seed": seed, "dir": str(out), "artifact": str(artifact), "val_curve": curve,
            "val_gap_curve": gaps,
            "val_ce": curve[-1][1], "val_kl": evals[-1].get("kl_adapted", evals[-1]["kl_spliced"]),
            "steps": sum(1 for ln in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' not in ln)}


def _finished(out: Path, cfg: Any) -> bool:
    """Whether `out` holds a run with exactly this config that reached its last step (for --reuse-runs)."""
    try:
        same = json.loads((out / "config.json").read_text()) == cfg.to_json()
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return False
    return same and any(r.get("step") == cfg.max_steps and "eval" in r for r in rows)


class TestSet:
    """The test rows with the residual at the SAE's hook cached once, so each arm costs one partial forward."""

    def __init__(self, args: argparse.Namespace, sae_path: str) -> None:
        from saelora.adapters.activations import run_to_hook
        from saelora.adapters.corpus import CorpusConfig, load_corpus
        from saelora.adapters.models import load_model
        from saelora.adapters.saes import load_sae

        self.args = args
        self.lm = load_model(args.model)
        self.lm.model.requires_grad_(False)
        sae = load_sae(self.lm.model, sae_path, tokenizer=self.lm.tokenizer)
        corpus = load_corpus(self.lm.tokenizer, CorpusConfig(tuple(args.corpus), args.seq_len,
                                                             val_fraction=args.val_fraction,
                                                             test_fraction=args.test_fraction,
                                                             prepend_bos=sae.policy.prepend_bos))
        n = -(-args.eval_tokens // args.seq_len)
        if len(corpus.test) < n:
            log.warning("test split has %d rows, fewer than the %d asked for", len(corpus.test), n)
        self.rows = corpus.test[:n]
        self.point = sae.hook
        with torch.no_grad():
            self.prefix = torch.cat([run_to_hook(self.lm.model, sae.hook, self.rows[i:i + 8])
                                     for i in range(0, len(self.rows), 8)])
        self.corpus_info = corpus.info

    def ce(self, sae_path: str | None, adapter: str | None = None, layers_after: bool = True) -> float:
        """Mean next-token CE on the test rows: base (no SAE), SAE spliced, or SAE spliced + adapter."""
        from saelora.adapters.bundle import attach_bundle, detach_adapter, load_bundle
        from saelora.adapters.saes import load_sae
        from saelora.trainer.objective import ce_per_token, plain_logits, spliced_logits

        model, saes = self.lm.model, []
        if sae_path:
            saes = [load_sae(model, sae_path, tokenizer=self.lm.tokenizer)]
        if adapter:
            model = attach_bundle(model, load_bundle(adapter, self.lm.fingerprint, saes, self.lm.model), "adapter")
        shared = adapter is None or layers_after  # no adapted layer before the hook: reuse the cached prefix
        total, count = 0.0, 0
        try:
            for i in range(0, len(self.rows), 8):
                ids, x = self.rows[i:i + 8], (self.prefix[i:i + 8] if shared else None)
                point = self.point if shared else None
                with torch.no_grad():
                    logits = spliced_logits(model, saes, ids, point, x, adapter=True)[0] if saes else \
                        plain_logits(model, ids, point, x)
                ce = ce_per_token(logits, ids)
                total, count = total + float(ce.sum()), count + ce.numel()
        finally:
            if adapter:
                detach_adapter(model, "adapter")  # the next call starts from the plain base model again
        return total / count


def sweep(args: argparse.Namespace, sae: str, work: Path) -> dict[str, list[dict[str, Any]]]:
    """Per arm: the learning-rate grid with seed 0 (chosen on validation CE), then the chosen rate with seed 1."""
    grids = {"lora_all": args.lora_lrs, "lora_after": args.lora_lrs, "sae_kl": args.sae_lrs}
    runs: dict[str, list[dict[str, Any]]] = {}
    for arm in ARMS:
        runs[arm] = [run(args, arm, lr, 0, work, sae) for lr in grids[arm]]
        best = min(runs[arm], key=lambda r: r["val_ce"])
        best["chosen"] = True
        runs[arm].append(dict(run(args, arm, best["lr"], 1, work, sae), chosen=True))
    return runs


def scratch_sae(args: argparse.Namespace, work: Path, steps: bool) -> tuple[str, float]:
    """A TopK SAE from scratch: trained with MSE (steps=True) or only initialised (steps=False, for e2e).
    Returns (folder, wall seconds, activation collection included)."""
    from saelora.trainer.train_sae import SAETrainConfig, train_sae

    sae_cfg = json.loads((Path(args.sae) / "cfg.json").read_text())
    cfg = SAETrainConfig(model=args.model, hook=sae_cfg["metadata"]["hook_name"], d_sae=sae_cfg["d_sae"],
                         k=sae_cfg.get("k", 32), corpus=list(args.corpus),
                         tokens=args.scratch_sae_tokens if steps else args.scratch_val_tokens, epochs=int(steps),
                         val_tokens=args.scratch_val_tokens, seq_len=args.sae_seq_len,
                         out=str(work / ("scratch_topk" if steps else "scratch_init")), seed=0,
                         cache_activations=not steps)  # TopK's time includes collecting its activations
    t0 = time.perf_counter()
    folder, _ = train_sae(cfg)
    return str(folder), time.perf_counter() - t0


def time_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """First time (s) a (time, CE) curve reaches `target`, linearly interpolated between evals."""
    if curve and curve[0][1] <= target:
        return curve[0][0]
    for (t0, c0), (t1, c1) in zip(curve, curve[1:], strict=False):
        if c1 <= target:
            return t1 if c0 == c1 else t0 + (t1 - t0) * (c0 - target) / (c0 - c1)
    return None


def from_scratch(args: argparse.Namespace, work: Path, test: TestSet) -> dict[str, Any]:
    """The paper's comparison: e2e SAE from scratch (KL) vs TopK SAE from scratch (MSE) + LoRA, total wall time."""
    topk, topk_s = scratch_sae(args, work, steps=True)
    init, _ = scratch_sae(args, work, steps=False)
    lora = run(args, "scratch_lora", args.scratch_lora_lr, 0, work / "scratch", topk)
    e2e = run(args, "e2e_scratch", args.scratch_e2e_lr, 0, work / "scratch", init, steps=args.e2e_steps)
    lora_curve = [(topk_s + t, c) for t, c in lora["val_curve"]]
    e2e_final_t, e2e_final = e2e["val_curve"][-1]
    e2e_t = time_to_reach(e2e["val_curve"], e2e_final)
    reach = time_to_reach(lora_curve, e2e_final)
    return {"topk_sae": topk, "topk_sae_seconds": round(topk_s, 1), "e2e_steps": args.e2e_steps,
            "lora": lora, "e2e": e2e, "topk_lora_val_curve": lora_curve,
            "e2e_final_val_ce": e2e_final, "e2e_seconds_to_final": e2e_t,
            "topk_lora_seconds_to_e2e_final": reach,
            "speedup": None if reach is None else round(e2e_t / reach, 2),
            "test_ce": {"topk_spliced": test.ce(topk), "topk_lora": test.ce(topk, lora["artifact"]),
                        "e2e": test.ce(_e2e_folder(e2e))}}


def _e2e_folder(rec: dict[str, Any]) -> str:
    """The fine-tuned SAE folder an e2e run wrote (out/saes/<name>)."""
    folders = sorted(p for p in Path(rec["artifact"]).iterdir() if (p / "cfg.json").is_file())
    return str(folders[0])


def summarise(args: argparse.Namespace, test: TestSet, runs: dict[str, list[dict[str, Any]]],
              scratch: dict[str, Any] | None) -> dict[str, Any]:
    base, spliced = test.ce(None), test.ce(args.sae)
    arms = {}
    for arm, recs in runs.items():
        for r in recs:
            if r.get("chosen"):
                r["test_ce"] = test.ce(_e2e_folder(r)) if arm == "sae_kl" else \
                    test.ce(args.sae, r["artifact"], layers_after=arm == "lora_after")
                r["gap_closed"] = (spliced - r["test_ce"]) / (spliced - base)
        chosen = [r for r in recs if r.get("chosen")]
        gaps = [r["gap_closed"] for r in chosen]
        arms[arm] = {"lr": chosen[0]["lr"], "gap_closed_mean": statistics.mean(gaps),
                     "gap_closed_seeds": gaps, "gap_closed_spread": max(gaps) - min(gaps),
                     "test_ce_seeds": [r["test_ce"] for r in chosen], "runs": recs}
    sae_cfg = json.loads((Path(args.sae) / "cfg.json").read_text())
    meta = sae_cfg["metadata"]
    return {"settings": {**vars(args), "eval_tokens": int(test.rows.numel()), "test_rows": len(test.rows)},
            "sae": {"folder": args.sae, "hook": meta["hook_name"], "d_sae": sae_cfg["d_sae"], "k": sae_cfg.get("k"),
                    **{k: meta.get(k) for k in ("fvu", "l0", "dead_latents", "dead_fraction", "train_seconds",
                                                "saelora_policy")}},
            "corpus": test.corpus_info, "ce_base": base, "ce_spliced": spliced, "gap": spliced - base,
            "arms": arms, "from_scratch": scratch,
            "targets": {"gap_closed_min": 0.30, "gap_closed_aim": 0.55, "speedup_min": 2}}


def parse_args() -> argparse.Namespace:
    from saelora.adapters.config import DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--quick", action="store_true", help="tiny budgets for CI (pair with a tiny --model/--sae/--corpus)")
    a("--model", default=DEFAULT_MODEL, help="model spec")
    a("--sae", default=None, help="SAE folder (default: the shipped SAE of the embedded model)")
    a("--corpus", action="append", default=None, help="corpus sources (default: wiki)")
    a("--run-steps", type=int, default=200, help="optimizer steps per run (equal tokens for every arm)")
    a("--schedule", default="cosine", help="learning-rate schedule of every run (decays to 0 at its last step)")
    a("--warmup-steps", type=int, default=10, help="linear warm-up steps")
    a("--evals", type=int, default=2, help="validation evals per run after the one at step 0")
    a("--val-rows", type=int, default=24, help="validation rows per eval (for the learning-rate choice and curves)")
    a("--eval-tokens", type=int, default=64_000, help="test tokens for the reported numbers")
    a("--lora-lrs", type=float, nargs="+", default=[1e-3, 2e-3], help="LoRA learning-rate grid")
    a("--sae-lrs", type=float, nargs="+", default=[3e-5, 1e-4], help="SAE KL fine-tune learning-rate grid")
    a("--rank", type=int, default=64, help="LoRA rank (the paper's 64)")
    a("--batch-size", type=int, default=2, help="rows per step")
    a("--seq-len", type=int, default=128, help="tokens per row (the SAE's training context)")
    a("--val-fraction", type=float, default=0.03, help="validation band of documents")
    a("--test-fraction", type=float, default=0.07, help="test band of documents (below the validation band)")
    a("--no-scratch", action="store_true", help="skip the from-scratch comparison")
    a("--scratch-sae-tokens", type=int, default=100_000, help="TopK-from-scratch SAE training tokens (1 epoch)")
    a("--scratch-val-tokens", type=int, default=20_000, help="held-out tokens for its quality record")
    a("--sae-seq-len", type=int, default=128, help="context of SAE training forwards")
    a("--scratch-lora-lr", type=float, default=2e-3, help="LoRA rate after the from-scratch TopK SAE")
    a("--scratch-e2e-lr", type=float, default=1e-3, help="rate of the e2e-from-scratch SAE")
    a("--e2e-steps", type=int, default=300, help="training steps of the e2e-from-scratch SAE")
    a("--reuse-runs", action="store_true", help="reuse runs already finished with the same config (after a crash)")
    a("--out", default=str(RESULTS), help="results folder")
    args = p.parse_args()
    args.corpus = args.corpus or ["wiki"]
    if args.quick:
        args.run_steps, args.evals, args.val_rows, args.eval_tokens = 3, 1, 2, 256
        args.lora_lrs, args.sae_lrs, args.seq_len, args.sae_seq_len = [1e-3, 3e-3], [1e-3], 32, 32
        args.scratch_sae_tokens, args.scratch_val_tokens, args.e2e_steps = 4_000, 500, 4
        args.val_fraction, args.test_fraction, args.rank = 0.1, 0.2, 4
    if args.sae is None:
        from saelora.adapters.saes import shipped_sae

        args.sae = str(shipped_sae(args.model))
    return args


def main() -> int:
    from saelora.adapters.config import cache_dir

    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "train_gap_quick" if args.quick else "train_gap"
    work = cache_dir() / "bench" / stem
    t0 = time.perf_counter()
    test = TestSet(args, args.sae)
    runs = sweep(args, args.sae, work)
    scratch = None if args.no_scratch else from_scratch(args, work, test)
    res = summarise(args, test, runs, scratch)
    res["wall_minutes"] = round((time.perf_counter() - t0) / 60, 1)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=str))
    write_md(res, out / f"{stem}.md")
    plot(res, out / f"{stem}.png")
    log.info("results in %s", out / f"{stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
