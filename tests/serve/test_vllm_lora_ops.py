"""saelora's grouped LoRA ops for vLLM on CPU equal the definition, y[i] += x[i] A[s]^T B[s]^T * scale with s the
token's adapter slot and nothing for slot -1, for decode (bgmv) and prefill (sgmv) layouts."""

import pytest
import torch

from saelora.serve.vllm_engine import lora_ops as L

S, IN, R, OUT = 3, 24, 4, 20


@pytest.fixture
def weights():
    g = torch.Generator().manual_seed(0)
    return torch.randn(S, 1, R, IN, generator=g), torch.randn(S, 1, OUT, R, generator=g)


def reference(x, a, b, slots, scale):
    y = torch.zeros(x.shape[0], OUT)
    for i, s in enumerate(slots):
        if s >= 0:
            y[i] = (x[i] @ a[s, 0].T) @ b[s, 0].T * scale
    return y


@pytest.mark.parametrize("slots", [[1, 1, 1, 1], [0, 1, 2, 0], [-1, 2, -1, 2], [-1, -1, -1, -1], [2, 2, -1, 0],
                                   [S - 1, -1, S - 1, -1]])
def test_bgmv_matches_definition(weights, slots):
    a, b = weights
    x = torch.randn(len(slots), IN)
    idx = torch.tensor(slots)
    buf, y = torch.zeros(len(slots), R), torch.ones(len(slots), OUT)
    L.bgmv_shrink(x, a, buf, idx, 0.5)
    L.bgmv_expand(buf, b, y, idx, add_inputs=True)
    torch.testing.assert_close(y, 1 + reference(x, a, b, slots, 0.5))
    sliced = torch.zeros(len(slots), OUT + 6)
    L.bgmv_expand_slice(buf, b, sliced, idx, 3, OUT, add_inputs=False)
    torch.testing.assert_close(sliced[:, 3:3 + OUT], reference(x, a, b, slots, 0.5))
    assert not sliced[:, :3].any() and not sliced[:, 3 + OUT:].any()


@pytest.mark.parametrize("segments", [[(0, 5)], [(-1, 3), (1, 4)], [(2, 2), (-1, 1), (2, 3), (0, 2)]])
def test_sgmv_matches_definition(weights, segments):
    a, b = weights
    slots = [s for s, n in segments for _ in range(n)]
    x = torch.randn(len(slots), IN)
    lora_idx, lens = torch.tensor([s for s, _ in segments]), torch.tensor([n for _, n in segments])
    starts = torch.cumsum(lens, 0) - lens
    buf, y = torch.zeros(len(slots), R), torch.zeros(len(slots), OUT)
    L.sgmv_shrink(x, a, buf, starts, lens, lora_idx, len(segments), int(lens.max()), len(slots), 2.0)
    L.sgmv_expand(buf, b, y, starts, lens, lora_idx, len(segments), int(lens.max()), len(slots), add_inputs=True)
    torch.testing.assert_close(y, reference(x, a, b, slots, 2.0))


def test_installed_into_vllms_cpu_wrapper():
    from vllm.lora.punica_wrapper import punica_cpu

    L.install()
    assert punica_cpu.bgmv_shrink is L.bgmv_shrink and punica_cpu.sgmv_expand_slice is L.sgmv_expand_slice
    L.install()  # idempotent: the originals stay recorded
    assert L._ORIG["bgmv_shrink"] is not L.bgmv_shrink


# ---- add_lora_linear through vLLM's own CPU punica wrapper, metadata set by vLLM's own update_metadata --------
SLICES = (20, 6, 6)  # a q/k/v-like merged projection: unequal slices


def _wrapper(lora_ids, slot_ids, prefill=False):
    """A PunicaWrapperCPU after vLLM's update_metadata for tokens with adapter ids `lora_ids` (0: none),
    `slot_ids[i]` the adapter id in slot i (None: empty)."""
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    L.install()
    w = PunicaWrapperCPU(256, 16, "cpu")
    w.update_metadata(LoRAMapping(tuple(lora_ids), tuple(lora_ids), is_prefill=prefill), list(slot_ids), len(slot_ids),
                      1000)
    return w


def _stacks(n_slots, slices=SLICES, seed=1):
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(n_slots, 1, R, IN, generator=g) for _ in slices)
    b = tuple(torch.randn(n_slots, 1, o, R, generator=g) for o in slices)
    return a, b


def _linear_reference(x, a, b, slots, scale):
    y = torch.zeros(x.shape[0], sum(SLICES))
    for i, s in enumerate(slots):
        if s >= 0:
            y[i] = torch.cat([(x[i] @ ai[s, 0].T) @ bi[s, 0].T for ai, bi in zip(a, b, strict=True)]) * scale
    return y


@pytest.mark.parametrize(("lora_ids", "plan"), [
    ([0, 0, 0], "none"),                    # base rows only: nothing added
    ([7, 7, 7, 7], "single"),               # one adapter, every token
    ([7, 9, 0, 7, 8], "mask"),              # a mixed decode batch, base rows among adapter rows
    ([9] * 40 + [0] * 30 + [7] * 3, "runs"),  # a long mixed batch (a prefill chunk beside decoding rows)
])
def test_add_lora_linear_equals_definition(lora_ids, plan):
    """Invariant: every token gets exactly its own slot's A then B, scaled, on its own slice of the output;
    base tokens (id 0) get nothing, even with every slot full (slot -1 is not the last slot)."""
    slot_ids = [9, 7, 8]  # every slot full
    w = _wrapper(lora_ids, slot_ids)
    assert w._saelora_plan.kind == plan
    a, b = _stacks(len(slot_ids))
    x = torch.randn(len(lora_ids), IN)
    y = torch.ones(len(lora_ids), sum(SLICES))
    w.add_lora_linear(y, x, a, b, 0.5, SLICES)
    slots = [slot_ids.index(i) if i else -1 for i in lora_ids]
    torch.testing.assert_close(y, 1 + _linear_reference(x, a, b, slots, 0.5))


def test_fused_slices_follow_slot_writes():
    """The fused (concatenated / block-diagonal) copy of a merged projection is rebuilt when vLLM writes a slot in
    place (a new adapter activated there), and inference tensors, which have no version counter, are not fused."""
    w = _wrapper([7, 7], [7, None])
    a, b = _stacks(2)
    x = torch.randn(2, IN)
    for _ in range(2):
        y = torch.zeros(2, sum(SLICES))
        w.add_lora_linear(y, x, a, b, 1.0, SLICES)
        torch.testing.assert_close(y, _linear_reference(x, a, b, [0, 0], 1.0))
        with torch.no_grad():  # vLLM's set_lora: copy_ into the slot
            b[1][0, 0].copy_(torch.randn(SLICES[1], R))
    with torch.inference_mode():
        a_inf, b_inf = (tuple(t.clone() for t in a), tuple(t.clone() for t in b))
    y = torch.zeros(2, sum(SLICES))
    w.add_lora_linear(y, x, a_inf, b_inf, 1.0, SLICES)
    torch.testing.assert_close(y, _linear_reference(x, a, b, [0, 0], 1.0))


def test_padding_ranks_are_cut_and_come_back():
    """vLLM pads every adapter to --max-lora-rank. The ranks no slot uses are not computed (a rank-2 adapter in
    rank-4 stacks runs as rank 2), and when a higher-rank adapter is written into a slot, its ranks are used."""
    w = _wrapper([7, 9, 7], [7, 9])
    a, b = _stacks(2)
    with torch.no_grad():
        for t in a:
            t[:, :, 2:] = 0
        for t in b:
            t[..., 2:] = 0
    x = torch.randn(3, IN)
    y = torch.zeros(3, sum(SLICES))
    w.add_lora_linear(y, x, a, b, 1.0, SLICES)
    torch.testing.assert_close(y, _linear_reference(x, a, b, [0, 1, 0], 1.0))
    assert next(iter(w._saelora_fused.values()))[1].a.shape[1] == 2 * len(SLICES)
    full_a, full_b = _stacks(2, seed=5)
    with torch.no_grad():  # a full-rank adapter activated in slot 1
        for t, f in zip(a + b, full_a + full_b, strict=True):
            t[1].copy_(f[1])
    y = torch.zeros(3, sum(SLICES))
    w.add_lora_linear(y, x, a, b, 1.0, SLICES)
    torch.testing.assert_close(y, _linear_reference(x, a, b, [0, 1, 0], 1.0))
    assert next(iter(w._saelora_fused.values()))[1].a.shape[1] == R * len(SLICES)
