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

    assert L.install()
    assert punica_cpu.bgmv_shrink is L.bgmv_shrink and punica_cpu.sgmv_expand_slice is L.sgmv_expand_slice
    assert L.install()  # idempotent: the originals stay recorded
    assert L._ORIG["bgmv_shrink"] is not L.bgmv_shrink
