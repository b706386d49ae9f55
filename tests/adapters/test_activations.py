"""Running to a hook and resuming from it reproduces the full forward exactly."""

import pytest
import torch

from saelora.adapters.activations import resume_from_hook, run_to_hook
from saelora.adapters.hooks import HookPoint, decoder_layers
from saelora.adapters.saes import place_sae
from saelora.adapters.splice_hooks import splice
from tiny import make_sae, tiny_gpt2, tiny_llama

IDS = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("point", [HookPoint(0, "post"), HookPoint(1, "pre"), HookPoint(1, "post"),
                                   HookPoint(0, "pre"), HookPoint(2, "post")])
def test_prefix_then_suffix_equals_full_forward(make, point):
    model = make()
    with torch.no_grad():
        full = model(IDS).logits
        x = run_to_hook(model, point, IDS)
        with resume_from_hook(model, point, x):
            resumed = model(IDS).logits
    assert torch.equal(resumed, full)
    assert all("forward" not in vars(layer) for layer in decoder_layers(model))


def test_run_to_hook_stops_early(llama):
    calls = []
    h = decoder_layers(llama)[2].register_forward_hook(lambda *a: calls.append(1))
    run_to_hook(llama, HookPoint(1, "post"), IDS)
    h.remove()
    assert calls == []


def test_splice_at_the_injection_point_sees_the_injected_stream(llama):
    s = place_sae(llama, make_sae("topk"), source="t")
    with torch.no_grad():
        with splice(llama, [s], mode="replace"):
            full = llama(IDS).logits
        x = run_to_hook(llama, s.hook, IDS)
        with resume_from_hook(llama, s.hook, x), splice(llama, [s], mode="replace"):
            resumed = llama(IDS).logits
    assert torch.equal(resumed, full)
