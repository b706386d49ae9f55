"""Teacher and student logits, and the KL objective of the paper.

teacher = the frozen model, SAEs off, adapters disabled, no grad.
student = the model with its LoRA adapter, SAEs spliced in `replace` mode at the positions of each
          SAE's position policy (the others stay original, as the paper does for BOS/EOS).
loss    = KL(p_teacher || p_student) over every next-token position (+ optional CE and MSE terms).

When the LoRA adapter touches no layer before the first SAE (`layers="after"`), teacher and student
share the layers up to that SAE exactly: they are run once (`prefix_point`), without grad.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from saelora.adapters.activations import resume_from_hook, run_to_hook
from saelora.adapters.hooks import HookPoint
from saelora.adapters.saes import LoadedSAE
from saelora.adapters.splice import SpliceStats
from saelora.adapters.splice_hooks import splice


def adapters_disabled(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Context in which a PeftModel runs as its base model (a plain model: nothing to disable)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


def kl_per_token(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_teacher || p_student) per position: (B, T, V) x2 -> (B, T), computed in fp32."""
    lt = F.log_softmax(teacher_logits.float(), dim=-1)
    ls = F.log_softmax(student_logits.float(), dim=-1)
    return (lt.exp() * (lt - ls)).sum(-1)


def ce_per_token(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: logits (B, T, V), ids (B, T) -> (B, T-1)."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")


@contextlib.contextmanager
def _from(model: torch.nn.Module, point: HookPoint | None, x: torch.Tensor | None) -> Iterator[None]:
    if point is None:
        yield
    else:
        with resume_from_hook(model, point, x):
            yield


def first_splice_point(saes: Sequence[LoadedSAE]) -> HookPoint | None:
    """The earliest SAE's hook point: the layers before it run alike with and without the SAEs (None when there
    is no layer before it, or no SAE)."""
    first = min((s.hook for s in saes), key=lambda p: p.depth, default=None)
    return None if first is None or first.depth == 0 else first


def prefix(model: torch.nn.Module, point: HookPoint | None, ids: torch.Tensor) -> torch.Tensor | None:
    """Residual stream at `point` with adapters disabled (None when no prefix is shared)."""
    if point is None:
        return None
    with torch.no_grad(), adapters_disabled(model):
        return run_to_hook(model, point, ids)


def plain_logits(model: torch.nn.Module, ids: torch.Tensor, point: HookPoint | None = None,
                 x: torch.Tensor | None = None, adapter: bool = False) -> torch.Tensor:
    """Logits with no SAE spliced, no grad: (B, T, V); the adapter is disabled unless `adapter`."""
    ctx = contextlib.nullcontext() if adapter else adapters_disabled(model)
    with torch.no_grad(), ctx, _from(model, point, x):
        return model(input_ids=ids, use_cache=False).logits


def teacher_logits(model: torch.nn.Module, ids: torch.Tensor, point: HookPoint | None = None,
                   x: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the frozen base model (adapters disabled, no SAE, no grad): (B, T, V)."""
    return plain_logits(model, ids, point, x)


def spliced_logits(model: torch.nn.Module, saes: Sequence[LoadedSAE], ids: torch.Tensor, point: HookPoint | None = None,
                   x: torch.Tensor | None = None, adapter: bool = True, mode: str = "replace",
                   ) -> tuple[torch.Tensor, dict[str, list[SpliceStats]]]:
    """Logits (B, T, V) with `saes` spliced in `mode`, and the splice's per-SAE stats."""
    ctx = contextlib.nullcontext() if adapter else adapters_disabled(model)
    with ctx, _from(model, point, x), splice(model, saes, mode=mode, stats=True) as sp:
        logits = model(input_ids=ids, use_cache=False).logits
    return logits, sp.pop_stats()


@dataclass
class ObjectiveWeights:
    """Loss = kl + ce_weight * CE(student) + mse_weight * normalised SAE reconstruction MSE."""

    kl_reduction: str = "mean"  # "mean": per-token mean; "sum": summed over positions, mean over the batch (paper)
    ce_weight: float = 0.0
    mse_weight: float = 0.0


def objective(model: torch.nn.Module, saes: Sequence[LoadedSAE], ids: torch.Tensor, w: ObjectiveWeights,
              point: HookPoint | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The training loss for one batch `ids` (B, T) and its parts (floats, for logging)."""
    x = prefix(model, point, ids)  # (B, T, d) or None
    t_logits = teacher_logits(model, ids, point, x)
    s_logits, stats = spliced_logits(model, saes, ids, point, x)
    kl = kl_per_token(t_logits, s_logits)  # (B, T)
    loss = kl.sum(1).mean() if w.kl_reduction == "sum" else kl.mean()
    parts: dict[str, float] = {"kl": kl.mean().item()}
    if w.ce_weight:
        ce = ce_per_token(s_logits, ids).mean()
        loss = loss + w.ce_weight * ce
        parts["ce"] = ce.item()
    if w.mse_weight:
        mse = mse_term(stats)
        loss = loss + w.mse_weight * mse
        parts["mse"] = float(mse)
    parts["loss"] = loss.item()
    return loss, parts


def mse_term(stats: dict[str, list[SpliceStats]]) -> torch.Tensor | float:
    """The objective's MSE term: each splice's reconstruction MSE per element, summed over SAEs and forwards."""
    return sum(st.sse / (st.n * st.d) for per in stats.values() for st in per)


def sae_summary(stats: dict[str, list[SpliceStats]],
                sum_across: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
    """Accumulated splice stats -> per SAE {l0, fvu}. The stats are sums, so with `sum_across` (which sums a
    tensor over data-parallel processes) the result is that of every process's positions together."""
    names = [n for n, per in stats.items() if per]  # the splice's SAE order, one stats per forward: alike everywhere
    sums = torch.tensor([[sum(float(getattr(s, f)) for s in stats[n]) for f in ("sse", "sst", "n", "l0")]
                         for n in names], dtype=torch.float64)
    if sum_across is not None and names:
        sums = sum_across(sums)
    return {n: {"l0": float(l0) / max(float(cnt), 1.0), "fvu": float(sse) / max(float(sst), 1e-12)}
            for n, (sse, sst, cnt, l0) in zip(names, sums, strict=True)}
