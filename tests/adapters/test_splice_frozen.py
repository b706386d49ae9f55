"""Invariant: the rewritten splice (pure `splice_sae` + `Splice` hooks) equals the frozen pre-rewrite copy
(tests/frozen_splice.py) on random inputs: logits, captures, dense latents and stats, in every mode, with
per-row edits, padding, a position policy and two SAEs."""

import pytest
import torch

import frozen_splice
from saelora.adapters.policy import PositionPolicy
from saelora.adapters.saes import place_sae
from saelora.adapters.splice import LatentEdit, RowSpec
from saelora.adapters.splice_hooks import Splice
from tiny import make_sae, tiny_gpt2, tiny_llama

POLICY = PositionPolicy(keep_first=True, keep_token_ids=(5,), keep_norm_above=None)


def _saes(model, seed):
    return [place_sae(model, make_sae("topk" if i else "standard", hook=h, seed=seed + i), source="tiny",
                      name=f"s{i}", policy=POLICY if i == 0 else None)
            for i, h in enumerate(["blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"])]


def _rows(seed, b, prompt_len):
    g = torch.Generator().manual_seed(seed)
    ops = ["set", "add", "scale", "clamp_max", "clamp_min", "ablate"]
    modes = ["replace", "error_term", "off"]
    rows = []
    for r in range(b):
        def pick(n):
            return int(torch.randint(n, (1,), generator=g))

        edits = [LatentEdit(f"s{pick(2)}", pick(16), ops[pick(6)], float(torch.randn(1, generator=g) * 3),
                            positions=["all", "prompt", "generated", (0, 2, 5)][pick(4)])
                 for _ in range(pick(3))]
        rows.append(RowSpec(modes={"s1": modes[(seed + r) % 3]}, edits=edits, prompt_len=prompt_len))
    return rows


def _run(cls, model, saes, ids, mask, rows, mode):
    sp = cls(model, saes, mode=mode, top_k=4, dense=True, stats=True)
    if cls is Splice:
        ctx = sp.batch(rows=rows)
    else:
        sp.set_rows(rows)
        ctx = torch.no_grad()
    with sp, ctx, torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    return logits, sp.pop_captures(), sp.pop_dense(), sp.pop_stats()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", ["replace", "error_term", "off"])
def test_new_splice_equals_frozen_copy(make, seed, mode):
    model = make()
    saes = _saes(model, seed)
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 96, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in row 1
    rows = _rows(seed, 3, prompt_len=6)
    new = _run(Splice, model, saes, ids, mask, rows, mode)
    old = _run(frozen_splice.Splice, model, saes, ids, mask, rows, mode)
    assert torch.equal(new[0], old[0])
    for name in ("s0", "s1"):
        for a, b in zip(new[1][name], old[1][name], strict=True):
            assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values)
            assert torch.equal(a.positions, b.positions)
        for a, b in zip(new[2][name], old[2][name], strict=True):
            assert torch.equal(a, b)
        for a, b in zip(new[3][name], old[3][name], strict=True):
            assert all(torch.equal(getattr(a, k), b[k]) for k in ("sse", "sst", "l0", "n")) and a.d == int(b["d"])
