"""How an engine's raw outputs go on the wire: latents and logit pairs become protocol types here, rounded here,
and nowhere in an engine (engines return plain `Latents` and `LogitPairs`: serve/core/engine.py)."""

from __future__ import annotations

from typing import Any, Sequence

from saelora.clients import protocol as P

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


def wire_logits(pairs: LogitPairs | None, tok: Any) -> P.LatentLogits | None:
    """What a latent writes to the logits, with each token's text (None: the engine cannot tell)."""
    if pairs is None:
        return None
    return P.LatentLogits(**{side: [P.TokenValue(token=tok.decode([i]), token_id=i, value=round(v, DECIMALS))
                                    for i, v in side_pairs]
                             for side, side_pairs in zip(("promoted", "suppressed"), pairs, strict=True)})
