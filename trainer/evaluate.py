"""Evaluation: CE clean / spliced / spliced+adapter, fraction of the CE gap closed, KL, L0, FVU, drift."""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch

from saelora.adapters.hooks import HookPoint
from saelora.adapters.saes import LoadedSAE
from saelora.adapters.splice import SpliceStats

from .objective import (ce_per_token, first_splice_point, kl_per_token, plain_logits, prefix, sae_summary,
                        spliced_logits, teacher_logits)


def gap_closed(ce_base: float, ce_spliced: float, ce_adapted: float) -> float:
    """(CE_spliced - CE_spliced+adapter) / (CE_spliced - CE_base): 0 = no help, 1 = back to the base model."""
    gap = ce_spliced - ce_base
    return float("nan") if gap == 0 else (ce_spliced - ce_adapted) / gap


def bootstrap_interval(per_row: dict[str, list[float]], stat: Callable[[dict[str, float]], float], n: int = 1000,
                       seed: int = 0, level: float = 0.95) -> list[float]:
    """Percentile bootstrap interval of `stat` over rows, resampled in pairs (every key keeps the same rows).

    per_row: per key, one mean per row (rows of equal length, so the mean of row means is the token mean);
    stat: the statistic of the keys' means, e.g. the gap closed."""
    keys = list(per_row)
    count = len(per_row[keys[0]])
    rng = random.Random(seed)
    values = []
    for _ in range(n):
        pick = [rng.randrange(count) for _ in range(count)]
        values.append(stat({k: sum(per_row[k][i] for i in pick) / count for k in keys}))
    values.sort()
    tail = (1 - level) / 2
    return [values[int(tail * n)], values[min(n - 1, int((1 - tail) * n))]]


@dataclass
class EvalResult:
    """Means per token over the evaluated rows. The adapter fields are None when no adapter was evaluated.

    saes: per SAE name, {l0,fvu}_{spliced,adapted} over its spliced positions."""

    ce_base: float
    ce_spliced: float
    kl_spliced: float
    tokens: int
    saes: dict[str, dict[str, float]] = field(default_factory=dict)
    ce_adapted: float | None = None
    kl_adapted: float | None = None
    ce_adapter_only: float | None = None  # the adapter alone, SAE off (drift from the base model)
    kl_adapter_only: float | None = None
    gap_closed: float | None = None
    ce_cost_ci: list[float] | None = None  # 95% bootstrap intervals over rows (None with data parallel)
    gap_closed_ci: list[float] | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON form written to metrics.jsonl, eval.json and the manifest (None fields left out)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


class _Acc:
    """Running sums of per-token quantities."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.per_row: dict[str, list[float]] = {}  # this process's rows only

    def add(self, key: str, values: torch.Tensor) -> None:
        """values: (rows, positions)."""
        self.sums[key] = self.sums.get(key, 0.0) + float(values.sum())
        self.counts[key] = self.counts.get(key, 0) + values.numel()
        self.per_row.setdefault(key, []).extend(values.float().mean(-1).tolist())

    def mean(self, key: str) -> float:
        return self.sums[key] / max(self.counts[key], 1)

    def reduce(self, sum_across: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace the sums and counts by their totals over processes (the same keys on every process)."""
        keys = sorted(self.sums)
        local = torch.tensor([self.sums[k] for k in keys] + [float(self.counts[k]) for k in keys], dtype=torch.float64)
        total = sum_across(local).tolist()
        self.sums = dict(zip(keys, total[:len(keys)], strict=True))
        self.counts = {k: int(round(c)) for k, c in zip(keys, total[len(keys):], strict=True)}


def _merge(into: dict[str, list[SpliceStats]], new: dict[str, list[SpliceStats]]) -> None:
    for k, v in new.items():
        into.setdefault(k, []).extend(s.detach() for s in v)


def adapter_is_identity(model: torch.nn.Module) -> bool:
    """Whether the model's LoRA adapter adds exactly nothing: it has B matrices, all zero (PEFT's initialisation,
    a run's step 0), and no DoRA magnitudes. Its variants then equal those without it, bit for bit."""
    named = list(model.named_parameters())
    b = [p for n, p in named if ".lora_B." in n or ".lora_embedding_B." in n]
    return bool(b) and not any("lora_magnitude" in n for n, _ in named) and not any(bool(p.any()) for p in b)


def _eval_batch(model: torch.nn.Module, saes: Sequence[LoadedSAE], ids: torch.Tensor, point: HookPoint | None,
                adapter: bool, identity: bool, acc: _Acc, stats_sp: dict, stats_ad: dict) -> None:
    """One batch into the running sums: base, spliced and, with `adapter`, adapted and the adapter alone (copied,
    not run, when the adapter is the identity). Base and spliced, both with the adapter off, share the layers
    before the first SAE whatever `point` is: they run once."""
    x = prefix(model, point, ids)
    off = point or first_splice_point(saes)
    x_off = x if off is point else prefix(model, off, ids)
    base = teacher_logits(model, ids, off, x_off)
    ce_base = ce_per_token(base, ids)
    acc.add("ce_base", ce_base)
    sp, st = spliced_logits(model, saes, ids, off, x_off, adapter=False)
    ce_sp, kl_sp = ce_per_token(sp, ids), kl_per_token(base, sp)
    acc.add("ce_spliced", ce_sp)
    acc.add("kl_spliced", kl_sp)
    _merge(stats_sp, st)
    del sp
    if identity:
        acc.add("ce_adapted", ce_sp)
        acc.add("kl_adapted", kl_sp)
        _merge(stats_ad, st)
        acc.add("ce_adapter_only", ce_base)
        acc.add("kl_adapter_only", torch.zeros_like(kl_sp))
    elif adapter:
        ad, st = spliced_logits(model, saes, ids, point, x, adapter=True)
        acc.add("ce_adapted", ce_per_token(ad, ids))
        acc.add("kl_adapted", kl_per_token(base, ad))
        _merge(stats_ad, st)
        del ad
        drift = plain_logits(model, ids, point, x, adapter=True)  # the adapter alone, SAE off
        acc.add("ce_adapter_only", ce_per_token(drift, ids))
        acc.add("kl_adapter_only", kl_per_token(base, drift))


@torch.no_grad()
def evaluate(model: torch.nn.Module, saes: Sequence[LoadedSAE], rows: torch.Tensor, batch_size: int = 4,
             adapter: bool = True, point: HookPoint | None = None,
             sum_across: Callable[[torch.Tensor], torch.Tensor] | None = None) -> EvalResult:
    """Evaluate on `rows` (N, T). `adapter=False` skips the adapter variants (a plain or pre-training model).

    `point`: share the layers up to it between variants (valid when the adapter touches no layer before it).
    `sum_across`: sums a tensor over processes (data parallel: each process passes its share of the rows, and
    the result is that of all rows in one process).
    An adapter that adds nothing (adapter_is_identity: a run's step-0 eval) is not run: its variants are copied
    from the spliced and base ones, which they equal exactly.
    """
    acc, stats_sp, stats_ad = _Acc(), {}, {}
    identity = adapter and adapter_is_identity(model)
    for i in range(0, len(rows), batch_size):
        _eval_batch(model, saes, rows[i:i + batch_size], point, adapter, identity, acc, stats_sp, stats_ad)
    if sum_across is not None:
        acc.reduce(sum_across)
        acc.per_row = {}
    per_sae = {n: {f"{k}_spliced": v for k, v in d.items()} for n, d in sae_summary(stats_sp, sum_across).items()}
    res = EvalResult(ce_base=acc.mean("ce_base"), ce_spliced=acc.mean("ce_spliced"), kl_spliced=acc.mean("kl_spliced"),
                     tokens=acc.counts["ce_base"], saes=per_sae)
    if acc.per_row:
        cost = {k: acc.per_row[k] for k in ("ce_base", "ce_spliced")}
        res.ce_cost_ci = bootstrap_interval(cost, lambda m: m["ce_spliced"] - m["ce_base"])
    if adapter:
        res.ce_adapted, res.kl_adapted = acc.mean("ce_adapted"), acc.mean("kl_adapted")
        res.ce_adapter_only, res.kl_adapter_only = acc.mean("ce_adapter_only"), acc.mean("kl_adapter_only")
        res.gap_closed = gap_closed(res.ce_base, res.ce_spliced, res.ce_adapted)
        if acc.per_row:
            ce = {k: acc.per_row[k] for k in ("ce_base", "ce_spliced", "ce_adapted")}
            res.gap_closed_ci = bootstrap_interval(ce, lambda m: gap_closed(m["ce_base"], m["ce_spliced"],
                                                                            m["ce_adapted"]))
        for n, d in sae_summary(stats_ad, sum_across).items():
            per_sae.setdefault(n, {}).update({f"{k}_adapted": v for k, v in d.items()})
    return res


def format_table(result: dict[str, Any]) -> str:
    """A terminal table of an `EvalResult.to_json()` (plus `positions`, as `saelora eval` writes it)."""
    lines = [f"spliced at {name}: {desc}" for name, desc in result.get("positions", {}).items()]
    lines += [f"{'metric':28s} value", "-" * 40]
    for key in ("ce_base", "ce_spliced", "ce_adapted", "gap_closed", "kl_spliced", "kl_adapted",
                "ce_adapter_only", "kl_adapter_only", "tokens"):
        if key in result:
            v = result[key]
            lines.append(f"{key:28s} {v:.4f}" if isinstance(v, float) else f"{key:28s} {v}")
    for key in ("ce_cost_ci", "gap_closed_ci"):
        if result.get(key):
            lines.append(f"{key:28s} [{result[key][0]:.4f}, {result[key][1]:.4f}]")
    for name, d in result.get("saes", {}).items():
        for k, v in d.items():
            lines.append(f"{name + ' ' + k:28s} {v:.4f}")
    return "\n".join(lines)
