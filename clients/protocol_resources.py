"""Models of the server's resources: models, SAEs and their features, adapters (with the load and unload
requests), and the OpenAI error envelope. Pydantic only (no torch); re-exported by clients/protocol.py."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, Field

from .protocol_base import ADAPTER_NAME, MAX_PATH, PATH_COMPONENTS, _Strict


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "saelora"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None  # prompt + max_tokens the server admits (as vLLM's /v1/models reports it)
    saes: list[dict[str, Any]] | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class SAEInfo(BaseModel):
    id: str
    hook: str
    architecture: str
    d_in: int
    d_sae: int
    source: str
    fingerprint: str
    has_descriptions: bool = False
    policy: dict[str, Any] | None = Field(default=None, description="positions left original (never spliced or "
                                          "edited): keep_first, keep_token_ids, prepend_bos")


class SAEList(BaseModel):
    object: Literal["list"] = "list"
    data: list[SAEInfo]


class FeatureHistogram(BaseModel):
    """A latent's non-zero activations over the described corpus: counts[i] in [edges[i], edges[i + 1])."""

    edges: list[float] = Field(description="len(counts) + 1 bin edges, ascending (the last bin is open above)")
    counts: list[int]


class FeatureDescription(BaseModel):
    sae: str
    index: int
    density: float | None = None
    max: float | None = None
    top: list[dict[str, Any]] = Field(default_factory=list)
    described: bool = False
    logits: LatentLogits | None = None
    histogram: FeatureHistogram | None = Field(None, description="absent for descriptions written before it existed")


class TokenValue(BaseModel):
    token: str
    token_id: int
    value: float


class LatentLogits(BaseModel):
    """What the latent writes to the logits: its decoder direction through the final norm's gain and the
    unembedding (the direct path only; the norm's division by the residual's RMS is left out, which scales
    every value alike)."""

    promoted: list[TokenValue]
    suppressed: list[TokenValue]


class LoadLoRARequest(_Strict):
    lora_name: str = Field(..., pattern=ADAPTER_NAME, description="letters, digits, _ and -; at most 64")
    lora_path: str = Field(..., min_length=1, max_length=MAX_PATH, pattern=PATH_COMPONENTS,
                           description="bundle folder, relative to the server's --adapter-root when one is set; "
                                       "each component at most 255 characters (the file system's name limit)")


class UnloadLoRARequest(_Strict):
    lora_name: str = Field(..., pattern=ADAPTER_NAME)


class AdapterInfo(BaseModel):
    name: str
    path: str
    rank: int
    saes: list[str]
    in_flight: int = 0
    metrics: dict[str, Any] = Field(default_factory=dict)


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterInfo]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
