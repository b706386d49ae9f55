"""Per-request splice settings inside vLLM's worker, and the latents captured for each request.

vLLM's model forward sees one flat batch of tokens (N, d), not requests. Two public vLLM hooks tell the
spliced model which tokens belong to which request and what that request asked for:

- the request's `SamplingParams.extra_args["saelora"]` carries its settings (`encode_settings`);
- `SliceTracker`, a logits processor that never changes logits, is told by vLLM before every forward
  which request sits in which batch slot (`update_state`), so it keeps `SLOTS`: slot -> `SlotSpec`.
  Inside the forward, the attention metadata's `query_start_loc` gives each slot's token range.

Captured top-k latents go to `CAPTURES` (rid -> sae -> position -> (indices, values)), and the generated
positions where a request's `stop_when` condition held to `STOPS` (rid -> positions); the engine drains both
after each step: directly when vLLM runs in-process, else through `SaeloraWorkerExtension`
(`collective_rpc("saelora_pop_captures")`). State is per process: one vLLM engine per process.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from saelora.adapters.splice import RowSpec

from . import compat

KEY = "saelora"  # the extra_args key
Latents = dict[str, tuple[list[int], list[float]]]


@dataclass
class SlotSpec:
    """The request in one batch slot: saelora's request id (keys CAPTURES) and its checked row spec."""

    rid: str
    row: RowSpec


def encode_settings(rid: str, row: RowSpec) -> dict[str, Any]:
    """The extra_args entry for one request: its row spec, serialised once (plain JSON types, so it also crosses
    process boundaries)."""
    return {KEY: {"rid": rid, "row": row.to_json()}}


def decode_settings(extra_args: dict[str, Any] | None) -> SlotSpec | None:
    data = (extra_args or {}).get(KEY)
    return SlotSpec(rid=str(data["rid"]), row=RowSpec.from_json(data["row"])) if data else None


SLOTS: dict[int, SlotSpec] = {}  # batch slot -> settings of the request in it (worker side)
CAPTURES: dict[str, dict[str, dict[int, tuple[list[int], list[float]]]]] = {}
STOPS: dict[str, set[int]] = {}
_LOCK = threading.Lock()  # CAPTURES and STOPS are written by the worker and drained by the engine thread
Drained = tuple[dict[str, dict[str, dict[int, tuple[list[int], list[float]]]]], dict[str, set[int]]]


class SliceTracker(LogitsProcessor):
    """Keeps `SLOTS` in step with vLLM's persistent batch; leaves logits untouched."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        SLOTS.clear()

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(SLOTS, batch_update, lambda params, prompt, out: decode_settings(params.extra_args))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits


def record(rid: str, sae: str, positions: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> None:
    """Store one request's captured latents: positions (T,), indices/values (T, k)."""
    rows = zip(positions.tolist(), indices.tolist(), values.tolist(), strict=True)
    with _LOCK:
        per = CAPTURES.setdefault(rid, {}).setdefault(sae, {})
        for pos, idx, val in rows:
            per[pos] = (idx, val)


def record_stops(rid: str, positions: list[int]) -> None:
    """Store the generated positions where one request's stop condition held."""
    with _LOCK:
        STOPS.setdefault(rid, set()).update(positions)


def pop_captures() -> Drained:
    """What the splice recorded since the last call: (latents, stop positions), each keyed by request id."""
    global CAPTURES, STOPS
    with _LOCK:
        out, CAPTURES, STOPS = (CAPTURES, STOPS), {}, {}
    return out


class SaeloraWorkerExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`): lets the engine drain captures over RPC."""

    def saelora_pop_captures(self) -> Drained:
        return pop_captures()


# vLLM imports this module in every worker process it starts (`worker_extension_cls`), before it loads the model:
# the contract check, the spliced model classes and the patched ops are then in place there too, with no plugin
# entry point (compat.install runs once per process).
compat.install()
