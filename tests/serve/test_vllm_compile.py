"""The splice op (serve/vllm_engine/splice_op.py) under torch.compile: one opaque node, no graph break, compiled
equals eager, and the per-batch Python inside the op runs at every call rather than being frozen at trace time
(vLLM's CPU compilation traces once and drops guards, so anything traced would be frozen).

The live parity of the compiled vLLM engine with the torch engine is in test_vllm.py (`vllm_compiled_server`)."""

import torch
import torch._dynamo.utils as dynamo_utils

from saelora.serve.vllm_engine import splice_op


class EditRuntime:
    """A stand-in runtime with the real one's habits: dict lookups and a host sync (`.tolist()`) per call.
    Rows whose position is in `edit_at` get `shift` added to feature direction `d`; None: nothing to do."""

    def __init__(self, d: int) -> None:
        self.sae_names = ["s0", "s1"]
        self.edit_at: dict[str, set[int]] = {}
        self.direction = torch.zeros(d)
        self.direction[0] = 1.0
        self.calls = 0

    def __call__(self, name: str, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor | None:
        self.calls += 1
        rows = [i for i, p in enumerate(positions.tolist()) if p in self.edit_at.get(name, set())]
        if not rows:
            return None
        out = x.clone()
        out[rows] += 3.0 * self.direction
        return out


class TwoLayers(torch.nn.Module):
    """Two linear 'layers', each followed by a splice at its output, the way model.py wraps decoder layers."""

    def __init__(self, d: int, handle: int) -> None:
        super().__init__()
        self.a, self.b, self.handle = torch.nn.Linear(d, d), torch.nn.Linear(d, d), handle

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = torch.ops.saelora.splice(torch.relu(self.a(x)), positions, self.handle, 0)
        return torch.ops.saelora.splice(self.b(x), positions, self.handle, 1)


def test_the_splice_compiles_fullgraph_and_compiled_equals_eager_as_the_batch_changes():
    torch.manual_seed(0)
    rt = EditRuntime(16)
    model = TwoLayers(16, splice_op.register_runtime(rt)).eval()
    dynamo_utils.counters.clear()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    x, pos = torch.randn(6, 16), torch.arange(6)
    with torch.no_grad():
        assert torch.equal(compiled(x, pos), model(x, pos))  # nothing to splice: the op is the identity
        assert dynamo_utils.counters["graph_break"] == {}, dict(dynamo_utils.counters["graph_break"])
        frames = sum(dynamo_utils.counters["frames"].values())
        # the batch's settings change after the trace: the op reads them at run time
        rt.edit_at = {"s0": {2, 5}, "s1": {0}}
        want = model(x, pos)
        assert not torch.equal(want, compiled(torch.randn(6, 16), pos))  # sanity: a real change
        torch.testing.assert_close(compiled(x, pos), want)
        # another batch size, the same trace (dynamic token dimension)
        x3, pos3 = torch.randn(3, 16), torch.tensor([5, 6, 0])
        torch.testing.assert_close(compiled(x3, pos3), model(x3, pos3))
    assert sum(dynamo_utils.counters["frames"].values()) == frames  # no recompilation
    assert rt.calls > 8


def test_the_op_never_returns_its_input():
    """A functional custom op must not alias its input (the compiler may reuse it); unchanged means a copy."""
    rt = EditRuntime(4)
    handle = splice_op.register_runtime(rt)
    x = torch.randn(2, 4)
    y = torch.ops.saelora.splice(x, torch.arange(2), handle, 0)
    assert torch.equal(x, y) and y.data_ptr() != x.data_ptr()


def test_vllm_splits_piecewise_graphs_at_the_splice_on_gpus():
    """On GPUs the op joins vLLM's splitting ops, beside attention (the engine's compilation config)."""
    from vllm.config import CompilationConfig

    cfg = CompilationConfig(splitting_ops=[*CompilationConfig._attention_ops, *splice_op.SPLITTING_OPS])
    assert "saelora::splice" in cfg.splitting_ops and cfg.splitting_ops_contain_attention()
