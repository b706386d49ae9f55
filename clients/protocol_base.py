"""The building blocks of the protocol models: the API's limits, strict JSON types and the strict base model.
Pydantic only (no torch); clients/protocol.py, protocol_resources.py and protocol_steer.py build on them."""

from __future__ import annotations

import math
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

MAX_TOP_K = 64  # latents per token per SAE
MAX_EDITS = 64
MAX_N = 8
MAX_LOGPROBS = 20
MAX_SEED = 2**53 - 1  # exact in every JSON parser (doubles); torch and vLLM take up to 2**63 - 1
MAX_POSITIONS = 4096  # entries of an edit's positions list
MAX_POSITION = 1 << 20
MAX_PROMPT_IDS = 1 << 16
MAX_STOPS = 4
ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"  # no dots: PEFT builds module names from it
PRESET_NAME = ADAPTER_NAME  # a file name on the server: the same safe set
MAX_STOP_WHEN = 16
MAX_PRESETS = 256
LOGIT_TOP = 10  # tokens a latent promotes / suppresses (GET /v1/saes/{sae}/features/{i})
MAX_PATH = 1024
PATH_COMPONENTS = r"^[^/]{0,255}(/[^/]{0,255})*$"  # each component within NAME_MAX (255)
MAX_VECTOR = 16384  # numbers in a steering vector (the residual width)
MAX_VECTOR_EDITS = 8

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _json_number(v: Any) -> Any:
    """Numbers as JSON Schema has them: 2.0 is an integer, but "2" and true are not numbers."""
    if isinstance(v, (str, bytes, bool)):
        raise ValueError("must be a JSON number")
    return v


def _json_bool(v: Any) -> Any:
    if not isinstance(v, bool):
        raise ValueError("must be a JSON boolean")
    return v


JInt = Annotated[int, BeforeValidator(_json_number)]
JFloat = Annotated[float, BeforeValidator(_json_number)]


def jint(**bounds: int) -> Any:
    """A JSON integer with bounds (ge=, le=) that the schema shows as minimum / maximum, also inside a union."""
    return Annotated[int, Field(**bounds), BeforeValidator(_json_number)]


def _finite(v: float | None) -> float | None:
    if v is not None and not math.isfinite(v):
        raise ValueError("must be a finite number (NaN and Inf are rejected)")
    return v


VECTOR_VALUE_MAX = 1e30  # |a steering vector's number|: its norm then stays far inside float32 (the splice's dtype)
VectorValue = Annotated[float, Field(ge=-VECTOR_VALUE_MAX, le=VECTOR_VALUE_MAX), BeforeValidator(_json_number)]
