"""vLLM's logprob-rank op, eager on CPU.

vLLM's sampler ranks each sampled token among the vocabulary with `batched_count_greater_than`, a function
wrapped in `torch.compile` (inductor) so that on GPUs it does not materialise a (rows, vocab) boolean tensor.
On CPU that wrapper costs more than it saves:

- the first request that asks for logprobs compiles it inside the engine step, which stalls every running
  request: 18 s with an empty inductor cache and 4 s with a warm one on the embedded model
  (bench/vllm_first_logprobs.py; CI saw a 14 s response to a one-token request; decision 47);
- inductor needs a C++ compiler at run time, which the slim server image does not have.

The eager expression is the compiled one's own body, so the ranks are the same integers; the boolean tensor
it builds is rows x vocab bytes (e.g. 64 rows x 262k vocab = 17 MB), freed at once.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

def batched_count_greater_than(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per row of `x`, how many entries are >= that row's value in `values` (rows, 1): the 1-based rank."""
    return (x >= values).sum(-1)


def install() -> None:
    """Point vLLM's sampler at the eager op (on a CPU platform; compat.install checks the symbol exists)."""
    from vllm.v1.sample import sampler

    sampler.batched_count_greater_than = batched_count_greater_than
