"""Evaluation: CE clean / spliced / spliced+adapter, fraction of the CE gap closed, KL, L0, FVU, drift."""

from __future__ import annotations

from typing import Any, Sequence

import torch

from saelora.adapters.hooks import HookPoint
from saelora.adapters.saes import LoadedSAE

from .objective import (ce_per_token, kl_per_token, plain_logits, prefix, sae_summary, spliced_logits,
                        teacher_logits)


def gap_closed(ce_base: float, ce_spliced: float, ce_adapted: float) -> float:
    """(CE_spliced - CE_spliced+adapter) / (CE_spliced - CE_base): 0 = no help, 1 = back to the base model."""
    gap = ce_spliced - ce_base
    return float("nan") if gap == 0 else (ce_spliced - ce_adapted) / gap


class _Acc:
    """Running sums of per-token quantities."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, values: torch.Tensor) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + float(values.sum())
        self.counts[key] = self.counts.get(key, 0) + values.numel()

    def mean(self, key: str) -> float:
        return self.sums[key] / max(self.counts[key], 1)


def _merge(into: dict[str, list], new: dict[str, list]) -> None:
    for k, v in new.items():
        into.setdefault(k, []).extend({kk: vv.detach() for kk, vv in s.items()} for s in v)


@torch.no_grad()
def evaluate(model: torch.nn.Module, saes: Sequence[LoadedSAE], rows: torch.Tensor, batch_size: int = 4,
             adapter: bool = True, point: HookPoint | None = None) -> dict[str, Any]:
    """Evaluate on `rows` (N, T). `adapter=False` skips the adapter variants (a plain or pre-training model).

    `point`: share the layers up to it between variants (valid when the adapter touches no layer before it).
    """
    acc, stats_sp, stats_ad = _Acc(), {}, {}
    for i in range(0, len(rows), batch_size):
        ids = rows[i:i + batch_size]
        x = prefix(model, point, ids)
        base = teacher_logits(model, ids, point, x)
        acc.add("ce_base", ce_per_token(base, ids))
        sp, st = spliced_logits(model, saes, ids, point, x, adapter=False)
        acc.add("ce_spliced", ce_per_token(sp, ids))
        acc.add("kl_spliced", kl_per_token(base, sp))
        _merge(stats_sp, st)
        del sp
        if adapter:
            ad, st = spliced_logits(model, saes, ids, point, x, adapter=True)
            acc.add("ce_adapted", ce_per_token(ad, ids))
            acc.add("kl_adapted", kl_per_token(base, ad))
            _merge(stats_ad, st)
            del ad
            drift = plain_logits(model, ids, point, x, adapter=True)  # the adapter alone, SAE off
            acc.add("ce_adapter_only", ce_per_token(drift, ids))
            acc.add("kl_adapter_only", kl_per_token(base, drift))
    out: dict[str, Any] = {k: acc.mean(k) for k in acc.sums}
    out["tokens"] = acc.counts["ce_base"]
    per_sae = {n: {f"{k}_spliced": v for k, v in d.items()} for n, d in sae_summary(stats_sp).items()}
    if adapter:
        out["gap_closed"] = gap_closed(out["ce_base"], out["ce_spliced"], out["ce_adapted"])
        for n, d in sae_summary(stats_ad).items():
            per_sae.setdefault(n, {}).update({f"{k}_adapted": v for k, v in d.items()})
    out["saes"] = per_sae
    return out


def format_table(result: dict[str, Any]) -> str:
    """A terminal table of an `evaluate` result."""
    lines = [f"spliced at {name}: {desc}" for name, desc in result.get("positions", {}).items()]
    lines += [f"{'metric':28s} value", "-" * 40]
    for key in ("ce_base", "ce_spliced", "ce_adapted", "gap_closed", "kl_spliced", "kl_adapted",
                "ce_adapter_only", "kl_adapter_only", "tokens"):
        if key in result:
            v = result[key]
            lines.append(f"{key:28s} {v:.4f}" if isinstance(v, float) else f"{key:28s} {v}")
    for name, d in result.get("saes", {}).items():
        for k, v in d.items():
            lines.append(f"{name + ' ' + k:28s} {v:.4f}")
    return "\n".join(lines)
