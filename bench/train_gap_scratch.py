"""The train_gap study's from-scratch comparison (the paper's time comparison, v1 protocol: one e2e budget and
one learning rate per arm; issue 27 owes the v2 protocol: >= 3 e2e budgets, each swept, TopK checkpoints).

e2e SAE from scratch (KL) against a TopK SAE from scratch (MSE) followed by LoRA, on total wall time (SAE
training included). speedup = e2e's time to its final validation CE / TopK+LoRA's time to the same CE.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable


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


def from_scratch(args: argparse.Namespace, work: Path, run: Callable[..., dict[str, Any]],
                 test_ce: Callable[..., float]) -> dict[str, Any]:
    """The comparison; `run(arm, lr, seed, work, sae, steps=)` trains one run, `test_ce(sae, adapter)` is a
    test-band CE."""
    topk, topk_s = scratch_sae(args, work, steps=True)
    init, _ = scratch_sae(args, work, steps=False)
    lora = run("scratch_lora", args.scratch_lora_lr, 0, work / "scratch", topk)
    e2e = run("e2e_scratch", args.scratch_e2e_lr, 0, work / "scratch", init, steps=args.e2e_steps)
    lora_curve = [(topk_s + t, c) for t, c in lora["train_curve"]]
    e2e_final = e2e["train_curve"][-1][1]
    e2e_t = time_to_reach(e2e["train_curve"], e2e_final)
    reach = time_to_reach(lora_curve, e2e_final)
    return {"protocol": "v1 (one e2e budget, one learning rate per arm)",
            "topk_sae": topk, "topk_sae_seconds": round(topk_s, 1), "e2e_steps": args.e2e_steps,
            "lora": lora, "e2e": e2e, "topk_lora_val_curve": lora_curve,
            "e2e_final_val_ce": e2e_final, "e2e_seconds_to_final": e2e_t,
            "topk_lora_seconds_to_e2e_final": reach,
            "speedup": None if reach is None else round(e2e_t / reach, 2),
            "test_ce": {"topk_spliced": test_ce(topk), "topk_lora": test_ce(topk, lora["artifact"]),
                        "e2e": test_ce(e2e["artifact"])}}
