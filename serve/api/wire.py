"""How an engine's raw outputs go on the wire: latents and logit pairs become protocol types here, rounded here,
and nowhere in an engine (engines return plain `Latents` and `LogitPairs`: serve/core/engine.py)."""

from __future__ import annotations

from typing import Any, Sequence

from saelora.clients import protocol as P
from saelora.clients.compact import encode as encode_compact

from ..core.engine import Latents, LogitPairs, TokenFeaturesOut

DECIMALS = 5  # latent and logit values on the wire


def wire_latents(indices: Sequence[int], values: Sequence[float]) -> tuple[list[int], list[float]]:
    """A token's top-k latents as they go on the wire: inactive (zero) ones dropped, values rounded."""
    pairs = [(int(i), round(float(v), DECIMALS)) for i, v in zip(indices, values, strict=True) if v != 0]
    return [i for i, _ in pairs], [v for _, v in pairs]


def sae_latents(lat: Latents | None) -> list[P.SAELatents]:
    return [P.SAELatents(sae=name, indices=idx, values=val)
            for name, (idx, val) in ((n, wire_latents(*v)) for n, v in (lat or {}).items())]


def token_features(t: TokenFeaturesOut, tok: Any) -> P.TokenFeatures:
    return P.TokenFeatures(token=tok.decode([t.token_id]), token_id=t.token_id, position=t.position,
                           features=sae_latents(t.features))


def choice_features(prompt: Sequence[TokenFeaturesOut] | None, generated: Sequence[TokenFeaturesOut], tok: Any,
                    compact: bool = False) -> P.ChoiceFeatures:
    """A choice's latents (or a streamed chunk's) in the form the request asked for: one object per token and
    SAE, or the compact arrays (saelora.clients.compact: float16 values, k slots per token)."""
    if not compact:
        return P.ChoiceFeatures(prompt=None if prompt is None else [token_features(t, tok) for t in prompt],
                                generated=[token_features(t, tok) for t in generated])
    tokens = [*(prompt or []), *generated]
    k = max((len(idx) for t in tokens for idx, _ in (t.features or {}).values()), default=0)
    rows = [(tok.decode([t.token_id]), t.token_id, t.position, t.features or {}) for t in tokens]
    return P.ChoiceFeatures(compact=encode_compact(rows, k, prompt_count=len(prompt or [])))


def wire_logits(pairs: LogitPairs | None, tok: Any) -> P.LatentLogits | None:
    """What a latent writes to the logits, with each token's text (None: the engine cannot tell)."""
    if pairs is None:
        return None
    return P.LatentLogits(**{side: [P.TokenValue(token=tok.decode([i]), token_id=i, value=round(v, DECIMALS))
                                    for i, v in side_pairs]
                             for side, side_pairs in zip(("promoted", "suppressed"), pairs, strict=True)})
