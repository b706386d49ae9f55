"""Every server endpoint, declared once: what to send and how to read the answer.

Each function returns a `Call` (method, path, JSON body, parser). `SaeloraClient` runs it with httpx's blocking
client and `AsyncSaeloraClient` with the async one, so the two clients cannot drift apart: an endpoint, its
request model and its response model are written here and nowhere else. The server-sent-events framing and
the experiments' arithmetic (compare, contrast) are shared the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from saelora.adapters.search import DEFAULT_RANKING, MAX_DENSITY, LatentTally, rank_latents

from . import protocol as P
from . import protocol_steer as PS
from .errors import from_response, status_of


def _identity(x: Any) -> Any:
    return x


@dataclass(frozen=True)
class Call:
    """One HTTP request and the parser of its JSON answer."""

    method: str
    path: str
    body: Any = None
    parse: Callable[[Any], Any] = _identity


def _dump(model: Any) -> dict[str, Any]:
    return model.model_dump(exclude_none=True) if hasattr(model, "model_dump") else model


def models() -> Call:
    return Call("GET", "/v1/models", parse=P.ModelList.model_validate)


def complete(model: str, prompt: str | list[int], **kw: Any) -> Call:
    req = P.CompletionRequest(model=model, prompt=prompt, **kw)
    parse = _identity if req.stream else P.CompletionResponse.model_validate
    return Call("POST", "/v1/completions", _dump(req), parse)


def chat(model: str, messages: Sequence[dict[str, Any]], **kw: Any) -> Call:
    req = P.ChatCompletionRequest(model=model, messages=messages, **kw)
    parse = P.ChatCompletionChunk.model_validate if req.stream else P.ChatCompletionResponse.model_validate
    return Call("POST", "/v1/chat/completions", _dump(req), parse)


def features(model: str, text: str | None = None, messages: Sequence[dict[str, Any]] | None = None,
             top_k: int = 8, saes: list[str] | None = None) -> Call:
    given = {"input": text, "messages": messages, "saes": saes}  # absent, not null, when not given
    req = P.FeaturesRequest(model=model, top_k=top_k, **{k: v for k, v in given.items() if v is not None})
    return Call("POST", "/v1/features", _dump(req), P.FeaturesResponse.model_validate)


def steer_options(edits: Sequence[P.SAEEdit | P.SAEVectorEdit], top_k: int = 0, mode: str | None = None,
                  preset: str | None = None, stop_when: Sequence[P.SAECondition] = (),
                  compare: bool = False) -> P.SAEOptions:
    """The `sae` field of a steered completion: a preset and/or edits (latent edits and steering vectors), stop
    conditions, `compare`, and the top-k latents per token when top_k > 0. Without `mode`, the preset's (else
    error_term) applies."""
    opts: dict[str, Any] = {"mode": mode} if mode is not None else {}
    latents, vectors = _split(edits)
    return P.SAEOptions(edits=latents, vectors=vectors, preset=preset, stop_when=list(stop_when), compare=compare,
                        features=P.SAEFeatureOptions(top_k=top_k) if top_k else None, **opts)


def _split(edits: Sequence[P.SAEEdit | P.SAEVectorEdit]) -> tuple[list[P.SAEEdit], list[P.SAEVectorEdit]]:
    return [e for e in edits if isinstance(e, P.SAEEdit)], [e for e in edits if isinstance(e, P.SAEVectorEdit)]


def list_presets() -> Call:
    return Call("GET", "/v1/steering/presets", parse=P.PresetList.model_validate)


def get_preset(name: str) -> Call:
    return Call("GET", f"/v1/steering/presets/{name}", parse=P.PresetInfo.model_validate)


def put_preset(name: str, edits: Sequence[P.SAEEdit | P.SAEVectorEdit], mode: str = "error_term") -> Call:
    latents, vectors = _split(edits)
    body = _dump(P.SteeringPreset(mode=mode, edits=latents, vectors=vectors))  # type: ignore[arg-type]
    return Call("PUT", f"/v1/steering/presets/{name}", body, P.PresetInfo.model_validate)


def list_vectors() -> Call:
    return Call("GET", "/v1/steering/vectors", parse=PS.VectorList.model_validate)


def get_vector(name: str) -> Call:
    return Call("GET", f"/v1/steering/vectors/{name}", parse=PS.VectorInfo.model_validate)


def put_vector(name: str, values: Sequence[float] | None = None, positive: Sequence[str] | None = None,
               negative: Sequence[str] | None = None, sae: str | None = None) -> Call:
    if values is not None:
        req: Any = PS.VectorFromValues(sae=sae, values=list(values))
    else:
        req = PS.VectorFromTexts(sae=sae, positive=list(positive or []), negative=list(negative or []))
    body = _dump(req)
    return Call("PUT", f"/v1/steering/vectors/{name}", body, PS.VectorInfo.model_validate)


def delete_vector(name: str) -> Call:
    return Call("DELETE", f"/v1/steering/vectors/{name}")


def search(sae: str, q: str, n: int = 10) -> Call:
    from urllib.parse import quote

    return Call("GET", f"/v1/saes/{sae}/search?q={quote(q)}&n={n}", parse=PS.SearchResponse.model_validate)


def similar(sae: str, index: int, n: int) -> Call:
    return Call("GET", f"/v1/saes/{sae}/features/{index}/similar?n={n}",
                parse=PS.SimilarResponse.model_validate)


def auto_steer(name: str, positive: Sequence[str], negative: Sequence[str] | None = None,
               prompts: Sequence[str] | None = None, max_fluency_gap: float = 0.5, sae: str | None = None) -> Call:
    given = {"negative": negative, "prompts": prompts}
    req = PS.AutoSteerRequest(name=name, positive=list(positive), max_fluency_gap=max_fluency_gap, sae=sae,
                              **{k: list(v) for k, v in given.items() if v is not None})
    return Call("POST", "/v1/steering/auto", _dump(req), PS.AutoSteerResponse.model_validate)


def delete_preset(name: str) -> Call:
    return Call("DELETE", f"/v1/steering/presets/{name}")


def feature(sae: str, index: int) -> Call:
    return Call("GET", f"/v1/saes/{sae}/features/{index}", parse=P.FeatureDescription.model_validate)


def list_saes() -> Call:
    return Call("GET", "/v1/saes", parse=P.SAEList.model_validate)


def list_adapters() -> Call:
    return Call("GET", "/v1/adapters", parse=P.AdapterList.model_validate)


def load_adapter(name: str, path: str) -> Call:
    return Call("POST", "/v1/load_lora_adapter", _dump(P.LoadLoRARequest(lora_name=name, lora_path=path)))


def unload_adapter(name: str) -> Call:
    return Call("POST", "/v1/unload_lora_adapter", _dump(P.UnloadLoRARequest(lora_name=name)))


DONE = object()  # the end-of-stream marker


def sse_data(line: str) -> Any:
    """One server-sent-events line -> its JSON payload, `DONE` at `data: [DONE]`, or None for other lines.
    An error event raises the matching typed exception."""
    if not line.startswith("data: "):
        return None
    if line == "data: [DONE]":
        return DONE
    data = json.loads(line[6:])
    if "error" in data:
        raise from_response(status_of(data["error"]), data)
    return data


# ---- experiments: shared arithmetic ---------------------------------------------------------------------------
def kept_by_policy(policy: dict[str, Any] | None, t: P.TokenFeatures) -> bool:
    """Whether an SAE's position policy (as /v1/saes lists it) leaves this token original."""
    if not policy:
        return False
    return (bool(policy.get("keep_first")) and t.position == 0) or t.token_id in policy.get("keep_token_ids", ())


def _mean_latents(tokens: Sequence[P.TokenFeatures],
                  policies: dict[str, dict[str, Any] | None] | None = None) -> dict[tuple[str, int], float]:
    """Mean latent value per (sae, feature) over the tokens each SAE is spliced at (all, without policies)."""
    sums: dict[tuple[str, int], float] = {}
    counts: dict[str, int] = {}
    for t in tokens:
        for f in t.features:
            if policies is not None and kept_by_policy(policies.get(f.sae), t):
                continue
            counts[f.sae] = counts.get(f.sae, 0) + 1
            for i, v in zip(f.indices, f.values, strict=True):
                sums[(f.sae, i)] = sums.get((f.sae, i), 0.0) + v
    return {k: v / max(1, counts[k[0]]) for k, v in sums.items()}


def compare_result(prompt: str, steered: P.CompletionChoice, n: int = 10) -> dict[str, Any]:
    """A `compare: true` choice: steered and default (unsteered) completions side by side, with the latents
    whose mean changed most."""
    default = steered.unsteered or P.Unsteered()
    a, b = default.features, steered.features
    ma, mb = _mean_latents(a.generated if a else []), _mean_latents(b.generated if b else [])
    keys = sorted(set(ma) | set(mb), key=lambda k: -abs(mb.get(k, 0.0) - ma.get(k, 0.0)))[:n]
    changed = [{"sae": k[0], "feature": k[1], "default": round(ma.get(k, 0.0), 4),
                "steered": round(mb.get(k, 0.0), 4)} for k in keys]
    return {"prompt": prompt, "default": default.text, "steered": steered.text, "changed": changed}


def contrast_result(a: Sequence[P.FeaturesResponse], b: Sequence[P.FeaturesResponse], n: int,
                    saes: P.SAEList, ranking: str = DEFAULT_RANKING,
                    max_density: float = MAX_DENSITY) -> list[dict[str, Any]]:
    """The latents that most tell prompt set A from set B (adapters/search.py: by default the standardised mean
    difference, latents firing on more than `max_density` of B's tokens excluded; `ranking="mean_diff"` is the
    old ranking by raw mean difference), over the tokens each SAE's position policy splices (not the attention
    sink or BOS/EOS, as in training). Latents are top-k sparse: a latent outside a token's top-k counts as 0."""
    policies = {s.id: s.policy for s in saes.data}
    ta, tb = _tallies([t for r in a for t in r.tokens], policies), _tallies([t for r in b for t in r.tokens], policies)
    out = []
    for sae in sorted(set(ta) | set(tb)):
        for r in rank_latents(ta.get(sae, LatentTally()), tb.get(sae, LatentTally()), ranking, n, max_density):
            out.append({"sae": sae, "feature": r.feature, "score": round(r.score, 4), "mean_a": round(r.mean_a, 4),
                        "mean_b": round(r.mean_b, 4), "diff": round(r.mean_a - r.mean_b, 4),
                        "freq_a": round(r.freq_a, 4), "freq_b": round(r.freq_b, 4), "ranking": ranking})
    key = (lambda d: -abs(d["score"])) if ranking == "mean_diff" else (lambda d: -d["score"])
    return sorted(out, key=key)[:n]


def lens_agreement(promoted: Sequence[str], a: Sequence[P.FeaturesResponse],
                   b: Sequence[P.FeaturesResponse]) -> float:
    """The fraction of a latent's promoted tokens (what it writes to the logits) that are the concept's frequent
    tokens: more frequent in set A's tokens than in set B's (case and spaces ignored). A second signal beside
    `contrast_result`'s statistic: a latent that fires on a concept need not write it."""
    def freq(rs: Sequence[P.FeaturesResponse]) -> dict[str, float]:
        toks = [t.token.strip().lower() for r in rs for t in r.tokens]
        return {w: toks.count(w) / max(1, len(toks)) for w in set(toks)}
    fa, fb = freq(a), freq(b)
    words = [w.strip().lower() for w in promoted if w.strip()]
    return sum(fa.get(w, 0.0) > fb.get(w, 0.0) for w in words) / max(1, len(words))


def _tallies(tokens: Sequence[P.TokenFeatures], policies: dict[str, dict[str, Any] | None]) -> dict[str, LatentTally]:
    out: dict[str, LatentTally] = {}
    for t in tokens:
        for f in t.features:
            if not kept_by_policy(policies.get(f.sae), t):
                out.setdefault(f.sae, LatentTally()).add_token(zip(f.indices, f.values, strict=True))
    return out
