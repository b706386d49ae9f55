"""vLLM's logprob ranks on CPU come from saelora's eager op (sampler_ops.py): the same ranks as the definition,
and asking for logprobs compiles nothing (the compiled op stalled the engine 4-18 s on a first logprobs request)."""

import torch
import torch._dynamo.utils as dynamo_utils

from saelora.serve.vllm_engine import compat, sampler_ops


def ranks_by_definition(logprobs: torch.Tensor, token_ids: torch.Tensor) -> list[int]:
    """vLLM's rank of a token: how many vocabulary entries have a logprob >= the token's (ties count)."""
    out = []
    for row, tok in zip(logprobs.tolist(), token_ids.tolist(), strict=True):
        out.append(sum(1 for v in row if v >= row[tok]))
    return out


def test_install_points_vllms_sampler_at_the_eager_op():
    from vllm.v1.sample import sampler

    compat.install()
    compat.install()  # once per process
    assert sampler.batched_count_greater_than is sampler_ops.batched_count_greater_than


def test_gather_logprobs_ranks_equal_the_definition_and_compile_nothing():
    from vllm.v1.sample.sampler import Sampler

    compat.install()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=g).round(decimals=1)  # rounded: ties occur and must count
    logprobs = logits.log_softmax(-1)
    token_ids = torch.tensor([0, 17, 299, 42, int(logits[4].argmax())])
    dynamo_utils.counters.clear()
    got = Sampler.gather_logprobs(logprobs, 3, token_ids)
    assert sum(dynamo_utils.counters["frames"].values()) == 0, dict(dynamo_utils.counters)
    assert got.selected_token_ranks.tolist() == ranks_by_definition(logprobs, token_ids)
    assert got.selected_token_ranks[4] == 1  # the argmax ranks first
    torch.testing.assert_close(got.logprob_token_ids[:, 0], token_ids.to(torch.int32))
    torch.testing.assert_close(got.logprobs[:, 1:], logprobs.topk(3, dim=-1).values)
