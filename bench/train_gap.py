"""Study (v2 protocol): how much of a frozen SAE's CE gap LoRA closes, against the baselines a reviewer asks for.

Protocol (issue 27; docs/training.md says what differs from the paper):
- the embedded model and its shipped TopK SAE (or --sae), spliced under the SAE's position policy; corpus `mix`;
- documents go to bands by a hash of their text: dev [0, 0.07) (the earlier studies' test rows, read before: not
  used here), validation [0.07, 0.10) (every choice), test [0.10, 0.12) (the reserve band: no run trains on it,
  read once, after every choice is frozen), train [0.12, 1) (the shipped SAE's training band too);
- arms, each at an equal budget of optimizer steps (equal tokens, cosine decay to 0): LoRA on all layers
  (`lora_all`), LoRA on the layers after the SAE (`lora_after`), the SAE fine-tuned with KL (`sae_kl`, Karvonen
  2025) and with KL + MSE (`sae_kl_mse`; the MSE weight makes both terms equal on validation rows at the start);
- per arm a log-spaced learning-rate grid with seed 0, extended by a point while the best is at an edge; the
  lowest validation CE is chosen; the chosen rate is rerun with seeds 1 and 2;
- the test band: gap closed per seed and for the seed mean, with 95% bootstrap intervals over test rows, under
  saelora's position policy and SAELens's convention; drift (the adapter alone against the base: CE and KL);
- `--stages scratch` adds the paper's from-scratch time comparison (still the v1 protocol: bench/train_gap_scratch.py).

    python bench/train_gap.py                      # grid, seeds, test: ~1.7 h on 2 idle CPU cores
    python bench/train_gap.py --stages scratch     # the from-scratch comparison alone -> train_gap_scratch.*
    python bench/train_gap.py --model gemma3-270m --seeds 2 --arms lora_all     # -> train_gap_gemma3-270m.*
    python bench/train_gap.py --quick --model M --sae S --corpus C   # CI smoke run on the tiny model

Every run is recorded as it finishes in <out>/train_gap_runs.json (also the pilots); the choices are written to
<out>/train_gap_choices.json before the test band is read. Writes <out>/train_gap.{json,md,png}
(train_gap_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from train_gap_bands import CONVENTIONS, Band, Variant, gap_summary, seed_mean  # noqa: E402
from train_gap_grid import bracketed_sweep  # noqa: E402
from train_gap_report import plot, write_md  # noqa: E402

log = logging.getLogger("bench.train_gap")
RESULTS = Path(__file__).parent / "results"
ARMS = ("lora_all", "lora_after", "sae_kl", "sae_kl_mse")
SAE_ARMS = ("sae_kl", "sae_kl_mse", "e2e_scratch")
AFTER_ARMS = ("lora_after", "scratch_lora")  # LoRA on the layers after the SAE only (the cached prefix is shared)
STAGES = ("grid", "seeds", "test", "scratch")


class Study:
    """The model, the bands and the settings every run shares."""

    def __init__(self, args: argparse.Namespace) -> None:
        from saelora.adapters.corpus import CorpusConfig, load_corpus
        from saelora.adapters.models import load_model
        from saelora.adapters.policy import corpus_bos
        from saelora.adapters.saes import load_sae

        self.args = args
        self.reused: set[str] = set()  # runs this invocation reused, not trained (their time is not in its wall time)
        self.lm = load_model(args.model)
        self.lm.model.requires_grad_(False)
        policy = load_sae(self.lm.model, args.sae, tokenizer=self.lm.tokenizer).policy
        self.corpus = load_corpus(self.lm.tokenizer, CorpusConfig(
            tuple(args.corpus), args.seq_len, val_fraction=args.val_fraction, test_fraction=args.dev_fraction,
            reserve_fraction=args.test_fraction, prepend_bos=corpus_bos([policy])))
        self.val = Band(self.lm, args.sae, self.corpus.val[:args.val_rows])
        self.val_spliced = self.val.per_row(Variant(sae=args.sae))
        self.mse_weight = args.mse_weight or self._equal_mse_weight()

    @functools.cached_property
    def test(self) -> Band:
        """The test band (the reserve band), its prefix cached once for every stage that reads it."""
        return Band(self.lm, self.args.sae, self.corpus.reserve[:self.args.test_rows])

    def _equal_mse_weight(self) -> float:
        """The weight that makes the MSE term equal to the KL on 8 validation rows at the start (SAE as shipped)."""
        import torch

        from saelora.adapters.saes import load_sae
        from saelora.trainer.objective import kl_per_token, mse_term, plain_logits, spliced_logits

        ids, sae = self.val.rows[:8], load_sae(self.lm.model, self.args.sae, tokenizer=self.lm.tokenizer)
        with torch.no_grad():
            sp, stats = spliced_logits(self.lm.model, [sae], ids, adapter=False)
            kl = float(kl_per_token(plain_logits(self.lm.model, ids), sp).mean())
        mse = float(mse_term(stats))
        log.info("KL %.4f, per-element MSE %.4f at the start: mse_weight %.3g", kl, mse, kl / mse)
        return kl / mse

    def config(self, arm: str, lr: float, seed: int, out: Path, sae: str, steps: int, evals: int,
               eval_rows: int) -> Any:
        from saelora.trainer.config import LoraSettings, TrainConfig

        a = self.args
        return TrainConfig(model=a.model, saes=[sae], corpus=list(a.corpus), out=str(out),
                           lora=LoraSettings(rank=a.rank, layers="after" if arm in AFTER_ARMS else "all"),
                           lr=lr, seed=seed, max_steps=steps, schedule="cosine",
                           warmup_steps=min(a.warmup_steps, steps // 4),
                           eval_interval=max(1, steps // evals) if evals else 0, eval_rows=eval_rows,
                           batch_size=a.batch_size, seq_len=a.seq_len, val_fraction=a.val_fraction,
                           test_fraction=a.dev_fraction, reserve_fraction=a.test_fraction, checkpoint_interval=0,
                           mse_weight=self.mse_weight if arm == "sae_kl_mse" else 0.0)

    def run(self, arm: str, lr: float, seed: int, work: Path, sae: str | None = None, steps: int | None = None,
            evals: int = 0, eval_rows: int | None = None) -> dict[str, Any]:
        """Train one run (or reuse a finished one with the same config) and evaluate it on the validation band.
        `evals`: the trainer's own evals after step 0 (its curve), on `eval_rows` validation rows."""
        from saelora.trainer.e2e import train_e2e
        from saelora.trainer.evaluate import gap_closed
        from saelora.trainer.train import train_lora

        sae, steps = sae or self.args.sae, steps or self.args.run_steps
        out = work / f"{arm}-lr{lr:g}-s{seed}-n{steps}"
        cfg = self.config(arm, lr, seed, out, sae, steps, evals, eval_rows or self.args.train_eval_rows)
        if _finished(out, cfg):
            log.info("%s lr %g seed %d: reusing the finished run in %s", arm, lr, seed, out)
            self.reused.add(out.name)
        else:
            log.info("%s lr %g seed %d for %d steps", arm, lr, seed, steps)
            (train_e2e if arm in SAE_ARMS else train_lora)(cfg)
        artifact = _sae_folder(out) if arm in SAE_ARMS else str(out / "adapter")
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
        evs = [(r["step"], r["eval"]) for r in rows if "eval" in r]
        key = "ce_spliced" if arm in SAE_ARMS else "ce_adapted"
        ce = statistics.fmean(self.val.per_row(self.variant(arm, artifact, sae)))
        base, spliced = statistics.fmean(self.val.base), statistics.fmean(self.val_spliced)
        rec = {"arm": arm, "lr": lr, "seed": seed, "steps": steps, "sae": sae, "dir": str(out), "artifact": artifact,
               "train_s": round(evs[-1][1]["train_s"], 1), "tokens": steps * self.args.batch_size * self.args.seq_len,
               "train_curve": [(e["train_s"], step, e[key]) for step, e in evs], "val_ce": ce,
               "val_gap_closed": gap_closed(base, spliced, ce) if arm in ARMS else None}
        _merge_record(self.args, rec)
        return rec

    def variant(self, arm: str, artifact: str, sae: str | None = None, convention: str = "saelora") -> Variant:
        if arm in SAE_ARMS:
            return Variant(sae=artifact, convention=convention)
        return Variant(sae=sae or self.args.sae, adapter=artifact, layers_after=arm in AFTER_ARMS,
                       convention=convention)


def _finished(out: Path, cfg: Any) -> bool:
    """Whether `out` holds a run with exactly this config that reached its last step."""
    try:
        same = json.loads((out / "config.json").read_text()) == cfg.to_json()
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return False
    return same and any(r.get("step") == cfg.max_steps and "eval" in r for r in rows)


def _sae_folder(out: Path) -> str:
    """The fine-tuned SAE folder an e2e run wrote (out/saes/<name>)."""
    return str(next(p for p in sorted((out / "saes").iterdir()) if (p / "cfg.json").is_file()))


def _merge_record(args: argparse.Namespace, rec: dict[str, Any]) -> None:
    """Append a finished run to <out>/<stem>_runs.json (the record of every run, pilots included)."""
    path = Path(args.out) / f"{args.stem}_runs.json"
    old = json.loads(path.read_text()) if path.is_file() else []
    def key(r: dict[str, Any]) -> tuple:
        return r["arm"], r["lr"], r["seed"], r["steps"], Path(r.get("sae", "")).name

    kept = [r for r in old if key(r) != key(rec)]
    path.write_text(json.dumps(kept + [{k: v for k, v in rec.items() if k not in ("dir", "artifact")}], indent=1))


def sweep_arm(study: Study, arm: str, grid: list[float],
              work: Path) -> tuple[list[dict[str, Any]], dict[str, Any], bool]:
    """The grid with seed 0, bracketed (train_gap_grid.bracketed_sweep), chosen on validation CE."""
    return bracketed_sweep(arm, grid, lambda lr: study.run(arm, lr, 0, work), lambda r: r["val_ce"],
                           study.args.max_extend)


def grids(args: argparse.Namespace) -> dict[str, list[float]]:
    return {"lora_all": args.lora_all_lrs, "lora_after": args.lora_after_lrs, "sae_kl": args.sae_lrs,
            "sae_kl_mse": args.sae_lrs}


def choose(study: Study, work: Path) -> dict[str, Any]:
    """Stages grid and seeds: per arm, the sweep, the chosen rate and its runs with every seed."""
    out = {}
    for arm in study.args.arms:
        sweep, best, edge = sweep_arm(study, arm, grids(study.args)[arm], work)
        out[arm] = {"grid": sweep, "lr": best["lr"], "at_edge": edge, "chosen": [best]}
    if "seeds" in study.args.stages:
        for arm in study.args.arms:
            out[arm]["chosen"] += [study.run(arm, out[arm]["lr"], s, work) for s in range(1, study.args.seeds)]
    return out


def test_stage(study: Study, arms: dict[str, Any]) -> dict[str, Any]:
    """Freeze the choices, then read the test band once: gap closed per seed and seed mean, both conventions."""
    args = study.args
    frozen = {arm: {"lr": a["lr"], "seeds": [r["seed"] for r in a["chosen"]]} for arm, a in arms.items()}
    (Path(args.out) / f"{args.stem}_choices.json").write_text(json.dumps(
        {"frozen_at": time.strftime("%Y-%m-%d %H:%M:%S"), "choices": frozen}, indent=1))
    band = study.test
    spliced = {c: band.per_row(Variant(sae=args.sae, convention=c)) for c in CONVENTIONS}
    res: dict[str, Any] = {"rows": len(band.rows), "tokens": band.tokens, "ce_base": statistics.fmean(band.base),
                           "ce_spliced": {c: statistics.fmean(v) for c, v in spliced.items()}, "arms": {}}
    for arm, a in arms.items():
        per = {c: [band.per_row(study.variant(arm, r["artifact"], convention=c)) for r in a["chosen"]]
               for c in CONVENTIONS}
        res["arms"][arm] = {
            "lr": a["lr"], "seeds": frozen[arm]["seeds"],
            **{c: {"per_seed": [gap_summary(band.base, spliced[c], ad) for ad in per[c]],
                   "mean": gap_summary(band.base, spliced[c], seed_mean(per[c]))} for c in CONVENTIONS},
            "drift": [_drift(band, arm, r["artifact"], args.drift_rows) for r in a["chosen"]]
            if arm not in SAE_ARMS else None}
    return res


def _drift(band: Band, arm: str, adapter: str, rows: int) -> dict[str, float]:
    ce, kl = band.drift(adapter, arm in AFTER_ARMS, rows)
    return {"rows": len(ce), "ce_adapter_only": statistics.fmean(ce),
            "ce_base": statistics.fmean(band.base[:len(ce)]), "kl_adapter_only": kl}


def summary(study: Study, arms: dict[str, Any], test: dict[str, Any] | None,
            scratch: dict[str, Any] | None) -> dict[str, Any]:
    args = study.args
    sae_cfg = json.loads((Path(args.sae) / "cfg.json").read_text())
    meta = sae_cfg["metadata"]
    return {"protocol": "v2", "settings": vars(args), "command": " ".join(["python bench/train_gap.py", *args.argv]),
            "sae": {"folder": args.sae, "hook": meta["hook_name"], "d_sae": sae_cfg["d_sae"], "k": sae_cfg.get("k"),
                    **{k: meta.get(k) for k in ("fvu", "l0", "dead_latents", "dead_fraction", "saelora_policy",
                                               "train_activations")}},
            "corpus": study.corpus.info, "mse_weight": study.mse_weight,
            "validation": {"rows": len(study.val.rows), "tokens": study.val.tokens,
                           "ce_base": statistics.fmean(study.val.base),
                           "ce_spliced": statistics.fmean(study.val_spliced)},
            "arms": arms,
            "test": test, "from_scratch": scratch,
            "targets": {"gap_closed_min": 0.30, "gap_closed_aim": 0.55, "speedup_min": 2}}


def run_scratch(study: Study, work: Path, arms: dict[str, Any]) -> dict[str, Any]:
    """The paper's time comparison (bench/train_gap_scratch.py), its LoRA at lora_after's chosen rate."""
    from train_gap_scratch import from_scratch

    args = study.args
    frozen = Path(args.out) / f"{args.stem.removesuffix('_scratch')}_choices.json"
    lr = arms["lora_after"]["lr"] if "lora_after" in arms else \
        json.loads(frozen.read_text())["choices"]["lora_after"]["lr"] if frozen.is_file() else args.scratch_lora_lr
    def run(*a: Any, **k: Any) -> dict[str, Any]:
        return study.run(*a, **k, evals=args.evals, eval_rows=args.scratch_eval_rows)

    def test_ce(sae: str, adapter: str | None = None) -> float:
        return statistics.fmean(study.test.per_row(Variant(sae=sae, adapter=adapter)))

    return from_scratch(args, work, run, lr, test_ce)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from saelora.adapters.config import DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--quick", action="store_true", help="tiny budgets for CI (pair with a tiny --model/--sae/--corpus)")
    a("--model", default=DEFAULT_MODEL, help="model spec")
    a("--sae", default=None, help="SAE folder (default: the shipped SAE of the embedded model)")
    a("--corpus", action="append", default=None, help="corpus sources (default: mix)")
    a("--stages", nargs="+", default=["grid", "seeds", "test"], choices=STAGES, help="what to run")
    a("--arms", nargs="+", default=list(ARMS), choices=ARMS, help="the arms the grid, seeds and test stages run")
    a("--run-steps", type=int, default=100, help="optimizer steps per run (equal tokens for every arm)")
    a("--warmup-steps", type=int, default=5, help="linear warm-up steps, then cosine decay to 0")
    a("--lora-all-lrs", type=float, nargs="+", default=[2.5e-4, 5e-4, 1e-3, 2e-3], help="lora_all grid")
    a("--lora-after-lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3, 4e-3], help="lora_after grid")
    a("--sae-lrs", type=float, nargs="+", default=[5e-5, 1e-4, 2e-4, 4e-4], help="grid of both SAE arms")
    a("--max-extend", type=int, default=2, help="grid points added while the best rate sits at an edge")
    a("--seeds", type=int, default=3, help="seeds of the chosen rate (0 is the grid's run)")
    a("--mse-weight", type=float, default=0.0, help="sae_kl_mse's MSE weight (0: KL and MSE equal at the start)")
    a("--rank", type=int, default=64, help="LoRA rank (the paper's 64)")
    a("--batch-size", type=int, default=2, help="rows per step")
    a("--seq-len", type=int, default=128, help="tokens per row (the SAE's training context)")
    a("--dev-fraction", type=float, default=0.07, help="the dev band, below validation (not read by the study)")
    a("--val-fraction", type=float, default=0.03, help="the validation band (every choice)")
    a("--test-fraction", type=float, default=0.02, help="the test band, above validation (read once)")
    a("--val-rows", type=int, default=48, help="validation rows for the choices")
    a("--test-rows", type=int, default=192, help="test rows")
    a("--drift-rows", type=int, default=64, help="test rows for the drift KL (the adapter alone vs the base)")
    a("--train-eval-rows", type=int, default=2, help="rows of the trainer's own evals in the grid's runs")
    a("--evals", type=int, default=10, help="evals per from-scratch run after the one at step 0 (every 10%%)")
    a("--scratch-eval-rows", type=int, default=16, help="validation rows of the from-scratch runs' evals")
    a("--scratch-sae-tokens", type=int, default=200_000, help="TopK-from-scratch SAE training tokens (1 epoch)")
    a("--scratch-fractions", type=float, nargs="+", default=[0.25, 0.5, 1.0], help="its checkpoints, each + LoRA")
    a("--scratch-val-tokens", type=int, default=20_000, help="held-out tokens for its quality record")
    a("--sae-seq-len", type=int, default=128, help="context of SAE training forwards")
    a("--scratch-lora-lr", type=float, default=2e-3, help="LoRA rate after the TopK SAE (default: lora_after's "
      "chosen rate when the grid ran)")
    a("--e2e-budgets", type=int, nargs="+", default=[50, 100, 200], help="steps of the e2e-from-scratch SAEs")
    a("--e2e-lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3], help="their learning-rate grid")
    a("--out", default=str(RESULTS), help="results folder")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.corpus = args.corpus or ["mix"]
    if args.quick:
        args.run_steps, args.val_rows, args.test_rows, args.drift_rows, args.seq_len = 3, 2, 2, 2, 32
        args.lora_all_lrs = args.lora_after_lrs = args.sae_lrs = [1e-3, 3e-3]
        args.max_extend, args.seeds, args.sae_seq_len, args.rank, args.evals = 1, 2, 32, 4, 2
        args.scratch_sae_tokens, args.scratch_val_tokens, args.scratch_eval_rows = 4_000, 500, 2
        args.scratch_fractions, args.e2e_budgets, args.e2e_lrs = [0.5], [2, 4], [1e-3, 3e-3]
        args.dev_fraction, args.val_fraction, args.test_fraction = 0.1, 0.1, 0.2
    args.stem = "train_gap_quick" if args.quick else "train_gap" if args.model == DEFAULT_MODEL else \
        f"train_gap_{Path(args.model).name}"
    if "grid" not in args.stages:  # a pass without the grid writes its own files beside the study's
        args.stem += "_scratch"
    if args.sae is None:
        from saelora.adapters.saes import shipped_sae

        args.sae = str(shipped_sae(args.model))
    return args


def main(argv: list[str] | None = None) -> int:
    from saelora.adapters.config import cache_dir

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    work, t0 = cache_dir() / "bench" / args.stem, time.perf_counter()
    study = Study(args)
    arms = choose(study, work) if "grid" in args.stages else {}
    test = test_stage(study, arms) if "test" in args.stages and arms else None
    scratch = run_scratch(study, work, arms) if "scratch" in args.stages else None
    res = summary(study, arms, test, scratch)
    res["wall_minutes"] = round((time.perf_counter() - t0) / 60, 1)
    res["reused_runs"] = sorted(study.reused)
    stem = Path(args.out) / args.stem
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2, default=str))
    write_md(res, stem.with_suffix(".md"))
    plot(res, stem.with_suffix(".png"))
    log.info("results in %s", stem.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
