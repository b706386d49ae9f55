"""The train_gap study's held-out bands: rows with the residual at the SAE's hook cached once, and per-row CE
of the base model, of an SAE spliced (under a position convention), with or without an adapter.

Per-row means (rows of equal length) are what the bootstrap resamples: every interval is over rows, paired
(the same resampled rows for base, spliced and adapted).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("bench.train_gap")

# The position conventions a gap is reported under: saelora's (the SAE's recorded policy: a BOS-less sink,
# BOS/EOS ids and massive activations stay original) and SAELens's (special tokens only; the sink spliced).
CONVENTIONS: dict[str, str | None] = {"saelora": None, "saelens": "keep_first=0,keep_norm_above="}


@dataclass
class Variant:
    """What runs on a band: an SAE folder (None: the base model), an adapter bundle (checked against the SAE it
    was trained with), whether the adapter touches no layer before the hook (the cached prefix is then shared),
    the position convention, and whether the SAE is spliced (False: the adapter alone)."""

    sae: str | None = None
    adapter: str | None = None
    layers_after: bool = True
    convention: str = "saelora"
    splice: bool = True


class Band:
    """`rows` (N, T) of one band of `lm`'s corpus, with the residual at `hook_sae`'s hook cached."""

    def __init__(self, lm: Any, hook_sae: str, rows: torch.Tensor, batch: int = 8) -> None:
        from saelora.adapters.activations import run_to_hook
        from saelora.adapters.saes import load_sae

        self.lm, self.rows, self.batch, self.sae = lm, rows, batch, hook_sae
        self.point = load_sae(lm.model, hook_sae, tokenizer=lm.tokenizer).hook
        with torch.no_grad():
            self.prefix = torch.cat([run_to_hook(lm.model, self.point, rows[i:i + batch])
                                     for i in range(0, len(rows), batch)])
        self.base = self.per_row(Variant())

    @property
    def tokens(self) -> int:
        return int(self.rows.numel())

    def _saes(self, v: Variant) -> list[Any]:
        from saelora.adapters.saes import load_sae

        return [load_sae(self.lm.model, v.sae, tokenizer=self.lm.tokenizer, policy=CONVENTIONS[v.convention])] \
            if v.sae and v.splice else []

    def per_row(self, v: Variant) -> list[float]:
        """Mean next-token CE per row under `v`."""
        return self._run(v, 0)[0]

    def drift(self, adapter: str, layers_after: bool, rows: int) -> tuple[list[float], float]:
        """The adapter alone (SAE off) on the first `rows` rows: per-row CE, and mean KL(base || adapter)."""
        return self._run(Variant(sae=self.sae, adapter=adapter, layers_after=layers_after, splice=False), rows)

    def _run(self, v: Variant, kl_rows: int) -> tuple[list[float], float]:
        from saelora.adapters.bundle import attach_bundle, detach_adapter, load_bundle
        from saelora.trainer.objective import ce_per_token, kl_per_token, plain_logits, spliced_logits

        model, saes = self.lm.model, self._saes(v)
        if v.adapter:  # the bundle is checked against the SAE it was trained with (its recorded policy)
            trained_with = self._saes(Variant(sae=v.sae))
            model = attach_bundle(model, load_bundle(v.adapter, self.lm.fingerprint, trained_with, self.lm.model),
                                  "study")
        shared = v.adapter is None or v.layers_after
        n = kl_rows or len(self.rows)
        ce_rows: list[float] = []
        kl_sum, kl_count = 0.0, 0
        try:
            for i in range(0, n, self.batch):
                ids = self.rows[i:min(i + self.batch, n)]
                x, point = (self.prefix[i:i + len(ids)], self.point) if shared else (None, None)
                with torch.no_grad():
                    logits = spliced_logits(model, saes, ids, point, x, adapter=True)[0] if saes else \
                        plain_logits(model, ids, point, x, adapter=True)
                    ce_rows += ce_per_token(logits, ids).mean(-1).tolist()
                    if kl_rows:
                        kl = kl_per_token(plain_logits(model, ids, point, x), logits)
                        kl_sum, kl_count = kl_sum + float(kl.sum()), kl_count + kl.numel()
        finally:
            if v.adapter:
                detach_adapter(model, "study")  # the next variant starts from the plain base model
        return ce_rows, (kl_sum / kl_count if kl_count else 0.0)


def gap_summary(base: list[float], spliced: list[float], adapted: list[float]) -> dict[str, Any]:
    """The gap closed with its 95% bootstrap interval over rows (paired), and the CE figures."""
    from saelora.trainer.evaluate import bootstrap_interval, gap_closed

    n = len(adapted)
    per_row = {"b": base[:n], "s": spliced[:n], "a": adapted}
    ci = bootstrap_interval(per_row, lambda m: gap_closed(m["b"], m["s"], m["a"]))
    means = {k: statistics.fmean(v) for k, v in per_row.items()}
    return {"ce_adapted": means["a"], "gap_closed": gap_closed(means["b"], means["s"], means["a"]),
            "gap_closed_ci": ci, "rows": n}


def seed_mean(per_seed: list[list[float]]) -> list[float]:
    """Per row, the mean over seeds of the adapted CE (the figure for 'the arm', its interval over rows)."""
    return [statistics.fmean(col) for col in zip(*per_seed, strict=True)]
