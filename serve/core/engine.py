"""The engine interface the HTTP layer talks to. The embedded torch engine (`serve/torch_engine/`) implements it
and is the reference; a vLLM engine implements the same interface.

A generation streams events: `PromptLogprobs` and `PromptFeatures` (when asked), one `TokenEvent` per generated
token (with its text delta, logprobs and latents), then `Finished`.
"""

from __future__ import annotations

import abc
import logging
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Literal, get_args

from saelora.adapters.edits import Condition, Edit, SpliceError, SpliceNotFoundError, check_mode
from saelora.adapters.splice import RowSpec, check_edits

log = logging.getLogger(__name__)


# What went wrong, as the HTTP layer maps it (serve/api/errors.py): invalid 400, context_length 400 (with OpenAI's
# code "context_length_exceeded": the one 400 a schema-valid request can get), unauthorized 401, forbidden 403,
# not_found 404, conflict 409, too_large 413, queue_full 429, internal 500, not_ready 503.
ErrorKind = Literal["invalid", "context_length", "unauthorized", "forbidden", "not_found", "conflict", "too_large",
                    "queue_full", "internal", "not_ready", "timeout"]
ERROR_KINDS: tuple[str, ...] = get_args(ErrorKind)


class EngineError(Exception):
    """An error with a kind (`ErrorKind`) the HTTP layer maps to a status and an OpenAI error type."""

    def __init__(self, kind: ErrorKind, message: str, param: str | None = None) -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown error kind {kind!r}; one of {ERROR_KINDS}")
        super().__init__(message)
        self.kind, self.message, self.param = kind, message, param

    @classmethod
    def from_splice(cls, e: Exception, param: str) -> "EngineError":
        """A splice check's error (adapters/edits.py): 404 for an SAE or latent the server lacks, else 400."""
        return cls("not_found" if isinstance(e, SpliceNotFoundError) else "invalid", str(e), param)


def report_bug(exc: BaseException, where: str) -> str:
    """An unexpected exception (a bug): logged with its traceback under a fresh request id, which is returned for
    the client's message. The exception's own text never leaves the server."""
    rid = uuid.uuid4().hex[:16]
    log.error("internal error %s in %s", rid, where, exc_info=exc)
    return rid


class RowFailure(Exception):
    """A known reason one row fails (e.g. non-finite logits): its message is safe to show the client. Any other
    exception that ends a row is a bug, reported with a request id only (`RowState.fail`)."""


@dataclass
class Sampling:
    max_tokens: int = 16  # 0: none (an empty completion; with prompt_logprobs, the prompt scored)
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's logprob and the top k
    ignore_eos: bool = False  # an EOS token is then an ordinary token
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob (after the first) and the top k


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: Sampling
    splice: RowSpec = field(default_factory=RowSpec)  # modes, edits, stops, latents asked (the one request shape)
    adapter: str | None = None  # None: the base model


def check_splice(saes: list[dict[str, Any]], edits: list[Edit], stops: list[Condition], param: str) -> None:
    """EngineError (404 for an SAE or latent the server lacks, else 400) unless every edit and stop condition fits
    the SAEs as `Engine.saes()` lists them (the splice's own check, `check_edits`)."""
    try:
        check_edits({s["name"]: int(s["d_sae"]) for s in saes}, edits, stops,
                    {s["name"]: int(s["d_in"]) for s in saes})
    except SpliceError as e:
        raise EngineError.from_splice(e, param) from e


def check_request(req: GenerationRequest, saes: list[dict[str, Any]], vocab: int, max_len: int) -> GenerationRequest:
    """The one check of a generation request, on admission (every engine calls it; nothing checks a request
    again per step): EngineError for an empty prompt, one over the context limit, ids outside the vocabulary,
    an unknown mode or SAE, edits or stop conditions that do not fit the SAEs, or an unknown SAE to report.
    Returns the checked request, its row spec's `prompt_len` filled (what engines receive)."""
    if not req.prompt_ids:
        raise EngineError("invalid", "the prompt is empty", "prompt")
    if len(req.prompt_ids) + req.sampling.max_tokens > max_len:
        raise EngineError("context_length", f"This model's maximum context length is {max_len} tokens; the prompt "
                          f"has {len(req.prompt_ids)} and max_tokens is {req.sampling.max_tokens}.", "max_tokens")
    if any(not 0 <= t < vocab for t in req.prompt_ids):
        raise EngineError("invalid", f"prompt token ids must be in [0, {vocab})", "prompt")
    spec, names = req.splice, [s["name"] for s in saes]
    for param, asked in (("sae.mode", spec.modes), ("sae.features.saes", spec.report or [])):
        unknown = set(asked) - set(names)
        if unknown:
            raise EngineError("not_found", f"unknown SAE ids {sorted(unknown)}; loaded: {sorted(names)}", param)
    try:
        for mode in spec.modes.values():
            check_mode(mode)
    except SpliceError as e:
        raise EngineError("invalid", str(e), "sae.mode") from e
    if spec.top_k < 0:
        raise EngineError("invalid", "top_k must be >= 0", "sae.features.top_k")
    check_splice(saes, spec.edits, spec.stops, "sae")
    return replace(req, splice=replace(spec, prompt_len=len(req.prompt_ids)))


Latents = dict[str, tuple[list[int], list[float]]]  # sae id -> (indices, values): top-k, raw floats
LogitPairs = tuple[list[tuple[int, float]], list[tuple[int, float]]]  # (promoted, suppressed) (token id, logit)


@dataclass
class TokenFeaturesOut:
    position: int
    token_id: int
    features: Latents


@dataclass
class PromptFeatures:
    tokens: list[TokenFeaturesOut]


TokenScore = tuple[float, int, list[tuple[int, float]]]  # a token's logprob, its rank (1: the most likely), the top k


@dataclass
class PromptLogprobs:
    """Each prompt token's logprob given the tokens before it, under the request's model, adapter and splice
    (None for the first token, which nothing predicts), with the top k there. Sent before any token event."""

    scores: list[TokenScore | None]


@dataclass
class TokenEvent:
    token_id: int
    position: int
    text: str  # text delta released with this token (stop-string hold-back may delay text)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    features: Latents | None = None


@dataclass
class Finished:
    finish_reason: str  # stop | length
    text: str  # remaining text released at the end
    prompt_tokens: int
    completion_tokens: int
    # the end-of-sequence token that ended the row: no text and no event of its own, but a completion's logprobs
    # list it last, as OpenAI's and vLLM's do (lm-eval reads a loglikelihood up to that last token)
    eos: TokenEvent | None = None


Event = PromptFeatures | PromptLogprobs | TokenEvent | Finished


class Engine(abc.ABC):
    """What a serving engine provides."""

    tokenizer: Any
    model_id: str
    #: Whether the model runs in the server process, so that text sets can be read through it (DiffMean vectors,
    #: auto-steer). The vLLM engine's weights live in vLLM's worker: it does not.
    steers_from_text: bool = False

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    @property
    @abc.abstractmethod
    def ready(self) -> bool: ...

    @property
    def not_ready_reason(self) -> str:
        """Why `ready` is False: the message of the 503 that every model route and /health answer then."""
        return "the model is not loaded yet"

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[Event]:
        """Stream the events of one generation; raises EngineError for bad input or a full queue."""

    @abc.abstractmethod
    async def encode(self, prompt_ids: list[int], top_k: int, saes: list[str] | None,
                     adapter: str | None) -> list[TokenFeaturesOut]:
        """Per-token top-k latents of a prompt, without generating."""

    @abc.abstractmethod
    def saes(self) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def adapters(self) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    async def load_adapter(self, name: str, path: str) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def unload_adapter(self, name: str) -> None: ...

    async def latent_logits(self, sae: str, index: int, k: int) -> LogitPairs | None:
        """What latent `index` of SAE `sae` writes to the logits: the k (token id, logit) pairs it promotes most
        and the k it suppresses most; None when this engine cannot tell."""
        return None

    async def similar_latents(self, sae: str, index: int, n: int) -> list[tuple[int, float]]:
        """The n latents of SAE `sae` closest to latent `index` by decoder cosine (adapters/logit_lens.py)."""
        raise EngineError("not_found", "this server cannot compare latents: its engine does not hold the SAEs' "
                          "decoders", "index")

    async def steering_vector(self, sae: str, positive: list[str], negative: list[str]) -> list[float]:
        """DiffMean at SAE `sae`'s hook: mean residual of `positive` minus that of `negative` (adapters/steering.py).
        Needs the model's weights in this process: the torch engine has them, the vLLM engine does not."""
        raise EngineError("invalid", "this engine cannot read residuals for a DiffMean vector (the torch engine "
                          "can); give the vector as numbers (`values`)", "positive")

    async def auto_steer(self, sae: str, positive: list[str], negative: list[str], prompts: list[str] | None,
                         max_fluency_gap: float) -> Any:
        """`adapters.autosteer.AutoSteerResult` for these texts (the torch engine; see `steering_vector`)."""
        raise EngineError("invalid", "auto-steer generates with the model in this process: use the torch engine "
                          "(it stores a preset that the vLLM engine then serves the same way)", "name")

    @abc.abstractmethod
    def stats(self) -> dict[str, float]:
        """Gauges for /metrics: running rows, queued requests, adapters loaded."""

    @property
    @abc.abstractmethod
    def max_model_len(self) -> int: ...
