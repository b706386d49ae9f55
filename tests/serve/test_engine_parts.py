"""The torch engine's parts: KV stacking, sampling, incremental detokenisation with stop strings, its own LoRA
layers and adapter loads, and the last token's latents."""

import pytest
import torch

from saelora.serve.torch_engine import kv
from saelora.serve.core.engine import Sampling
from saelora.serve.core.sampling import Detokenizer, logprobs_of, sample
from tiny import tiny_llama, tiny_tokenizer


def test_stacked_caches_reproduce_solo_decoding():
    model = tiny_llama()
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    solo_logits, kvs = [], []
    with torch.no_grad():
        for p in prompts:
            from transformers import DynamicCache

            out = model(torch.tensor([p]), past_key_values=DynamicCache(), use_cache=True)
            kvs.append(kv.split(out.past_key_values, [len(p)])[0])
            nxt = model(torch.tensor([[3]]), past_key_values=out.past_key_values, use_cache=True)
            solo_logits.append(nxt.logits[0, -1])
        cache, s_max = kv.stack(kvs)
        lengths = [kv.row_len(k) for k in kvs]
        mask = torch.tensor([[0] * (s_max - n) + [1] * (n + 1) for n in lengths])
        out = model(torch.tensor([[3], [3]]), attention_mask=mask, position_ids=torch.tensor([[n] for n in lengths]),
                    past_key_values=cache, use_cache=True)
    for r in range(2):
        torch.testing.assert_close(out.logits[r, -1], solo_logits[r], atol=1e-5, rtol=1e-5)
    back = kv.split(out.past_key_values, [n + 1 for n in lengths])
    assert [kv.row_len(b) for b in back] == [6, 3]


def test_left_pad_positions():
    ids, mask, pos = kv.left_pad([[4, 5, 6], [7]], pad_id=0)
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [-1, -1, 0]]


def test_sampling_rules():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample(logits, Sampling(temperature=0), None) == 1
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, Sampling(temperature=1.0, top_k=2), g) for _ in range(200)}
    assert draws == {1, 3}
    draws = {sample(logits, Sampling(temperature=1.0, top_p=0.01), g) for _ in range(50)}
    assert draws == {1}
    a = [sample(logits, Sampling(temperature=1.0), torch.Generator().manual_seed(5)) for _ in range(3)]
    assert len(set(a)) == 1  # same seed, same draw
    lp, top = logprobs_of(logits, 1, 2)
    assert abs(lp - torch.log_softmax(logits, -1)[1].item()) < 1e-6 and [t for t, _ in top] == [1, 3]


def test_detokenizer_holds_back_stop_strings():
    tok = tiny_tokenizer(["the cat sat on the mat"])
    ids = tok("the cat sat on the mat", add_special_tokens=False)["input_ids"]
    d = Detokenizer(tok, stops=["on the"])
    released, hit = "", False
    for t in ids:
        delta, hit = d.add(t)
        released += delta
        if hit:
            break
    released += d.finish()
    assert hit and released == "the cat sat "
    d = Detokenizer(tok, stops=[])
    assert "".join(d.add(t)[0] for t in ids) + d.finish() == "the cat sat on the mat"


def test_top_p_below_fp32_range_keeps_the_most_likely_token():
    """Regression (found by schemathesis): top_p=5e-324 rounds to 0 in fp32 and used to keep no token (NaN)."""
    logits = torch.tensor([0.1, 2.0, -1.0])
    assert sample(logits, Sampling(temperature=1.0, top_p=5e-324), torch.Generator().manual_seed(0)) == 1


def test_tiny_temperature_is_greedy_not_nan():
    """Regression (found by schemathesis): temperature 2.2e-308 overflowed the logits to inf (NaN -> 500)."""
    logits = torch.tensor([0.1, 2.0, -1.0])
    assert sample(logits, Sampling(temperature=2.2250738585072014e-308), torch.Generator().manual_seed(0)) == 1


def _byte_level_tokenizer():
    """A small byte-level BPE (GPT-2 style): multi-byte characters span several tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["the café naïve 東京 tower 🙂 jumps", "über straße ½ price €5 déjà vu", "plain words and spaces"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_incremental_detokenizer_equals_full_decode():
    """Invariant: the text released token by token (then `finish`) is the full decode of the ids, for random id
    sequences that split multi-byte characters anywhere, special tokens included."""
    import random

    for tok in (_byte_level_tokenizer(), tiny_tokenizer(["the cat sat on the mat"])):
        rng = random.Random(0)
        for _ in range(300):
            ids = [rng.randrange(len(tok)) for _ in range(rng.randrange(1, 40))]
            d = Detokenizer(tok, stops=[])
            out = "".join(d.add(t)[0] for t in ids) + d.finish()
            assert out == tok.decode(ids, skip_special_tokens=True), ids


def test_detokenizer_decodes_a_window_not_the_whole_text():
    """Invariant (the cost): each token decodes a bounded window, not everything generated so far."""
    tok = tiny_tokenizer(["the cat sat on the mat"])
    lengths = []
    real = tok.decode
    tok.decode = lambda ids, **kw: lengths.append(len(ids)) or real(ids, **kw)
    d = Detokenizer(tok, stops=[])
    ids = tok("the cat sat on the mat " * 20, add_special_tokens=False)["input_ids"]
    for t in ids:
        d.add(t)
    assert len(ids) == 120 and max(lengths) <= 2


def test_batched_cache_across_joins_and_leaves_equals_solo(ws):
    """Invariant: greedy rows that join while others run and leave at different steps (the engine's batched KV
    cache is kept, selected down and rebuilt) give their solo outputs; so do n choices sharing one prefill."""
    import asyncio

    from conftest import make_engine
    from saelora.adapters.splice import RowSpec
    from saelora.serve.core.engine import GenerationRequest, Sampling, TokenEvent

    engine = make_engine(ws, max_batch=4)
    tok = engine.tokenizer
    jobs = [("the cat sat on", 60, 0.0), ("a big red fox jumps over the lazy", 3, 0.0), ("sun rises", 7, 0.02),
            ("river flows to the sea and", 9, 0.04), ("the dog", 5, 0.06)]  # (prompt, max_tokens, start delay s)
    branches, real = [], engine._batch_cache

    def spy(rows):
        kept = engine._batch[0] if engine._batch else []
        branches.append("same" if kept == rows else "subset" if kept and set(map(id, rows)) <= set(map(id, kept))
                        else "rejoin" if any(r in rows for r in kept) else "new")
        return real(rows)
    engine._batch_cache = spy

    async def one(prompt: str, n: int, delay: float, seed: int | None = None) -> tuple[list[int], list]:
        await asyncio.sleep(delay)
        req = GenerationRequest(tok(prompt)["input_ids"], Sampling(max_tokens=n, temperature=0.0 if seed is None
                                                                   else 1.0, seed=seed), RowSpec(top_k=3))
        toks, feats = [], []
        async for ev in engine.generate(req):
            if isinstance(ev, TokenEvent):
                toks.append(ev.token_id)
                feats.append(ev.features)
            assert not isinstance(ev, Exception)
        return toks, feats

    async def run():
        await engine.start()
        try:
            solo = [await one(p, n, 0) for p, n, _ in jobs]
            together = await asyncio.gather(*[one(p, n, d) for p, n, d in jobs])
            seeded_solo = [await one("the cat", 6, 0, seed=s) for s in (1, 2)]
            seeded = await asyncio.gather(*[one("the cat", 6, 0, seed=s) for s in (1, 2)])  # one shared prefill
            return solo, together, seeded_solo, seeded
        finally:
            await engine.stop()

    solo, together, seeded_solo, seeded = asyncio.run(run())
    for (s_toks, s_feats), (t_toks, t_feats) in zip(solo, together, strict=True):
        assert t_toks == s_toks
        for a, b in zip(s_feats, t_feats, strict=True):
            (ia, va), (ib, vb) = next(iter(a.values())), next(iter(b.values()))
            assert ia == ib and all(abs(x - y) <= 1e-3 * max(1.0, abs(x)) for x, y in zip(va, vb, strict=True))
    assert [t for t, _ in seeded] == [t for t, _ in seeded_solo] and seeded[0][0] != seeded[1][0]
    assert {"same", "subset", "rejoin"} <= set(branches)  # every way the batched cache is kept was taken


def _patterned_bundle(ws, out):
    """Bundle a2 with PEFT's per-module settings: an alpha pattern, rsLoRA scaling, and layer 0 only."""
    import json
    import shutil

    shutil.copytree(ws["a2"], out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg.update(alpha_pattern={"mlp.down_proj": 3.0}, use_rslora=True, layers_to_transform=[0])
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def test_served_lora_equals_peft_mixed_batch(ws, tmp_path):
    """Invariant: the torch engine's own LoRA layers give real PEFT's mixed-batch logits, row by row, for a batch
    mixing three adapters (one with an alpha pattern, rsLoRA and a layer filter, resolved as PEFT resolves them)
    and base rows; and detaching every adapter gives back the model it started as, bit for bit."""
    from saelora.adapters.bundle import attach_bundle, load_bundle, lora_weights
    from saelora.adapters.models import load_model
    from saelora.serve.torch_engine.lora import ServedLoRA

    lm = load_model(ws["model"], device="cpu")
    paths = {"a1": ws["a1"], "a2": ws["a2"], "a3": _patterned_bundle(ws, tmp_path / "a3")}
    bundles = {n: load_bundle(p, lm.fingerprint) for n, p in paths.items()}
    peft_model = lm.model
    for n, b in bundles.items():
        peft_model = attach_bundle(peft_model, b, n)
    peft_model = peft_model.double()  # fp64: rounding apart
    model = load_model(ws["model"], device="cpu").model.double()
    served = ServedLoRA(model)
    for n, b in bundles.items():
        served.attach(n, lora_weights(b, model))
    ids = torch.randint(3, 40, (4, 7), generator=torch.Generator().manual_seed(0))
    names = ["a1", "__base__", "a3", "a2"]
    with torch.no_grad():
        before = model(input_ids=ids).logits  # outside rows(): the base layers
        want = peft_model(input_ids=ids, adapter_names=names).logits
        want_same = peft_model(input_ids=ids, adapter_names=["a3"] * 4).logits
        with served.rows(names):
            got = model(input_ids=ids).logits
        with served.rows(["a3"] * 4):  # every row the same adapter
            same = model(input_ids=ids).logits
        with served.rows(["__base__"] * 4):
            plain = model(input_ids=ids).logits
        with peft_model.disable_adapter():
            disabled = peft_model(input_ids=ids).logits
        for n in bundles:
            served.detach(n)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(same, want_same, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(plain, disabled, atol=0, rtol=0)
    torch.testing.assert_close(before, plain, atol=0, rtol=0)
    torch.testing.assert_close(after, plain, atol=0, rtol=0)
    assert not torch.allclose(want[0], plain[0], atol=1e-3)  # the adapters do change the logits
    a3 = lora_weights(bundles["a3"], model)
    assert a3 and all(".layers.0." in p for p in a3)  # layers_to_transform: PEFT's matching, not every key
    assert not served.layers and not any("forward" in vars(m) for m in model.modules())  # nothing left behind


def test_served_lora_attaches_whole_or_not_at_all(ws):
    """Invariant: an adapter with one module that is not a linear layer of the model changes nothing."""
    from saelora.adapters.bundle import load_bundle, lora_weights
    from saelora.adapters.models import load_model
    from saelora.serve.torch_engine.lora import ServedLoRA

    lm = load_model(ws["model"], device="cpu")
    served = ServedLoRA(lm.model)
    weights = lora_weights(load_bundle(ws["a1"], lm.fingerprint), lm.model)
    bad = dict(weights, **{"model.norm": next(iter(weights.values()))})
    with pytest.raises(ValueError, match="model.norm"):
        served.attach("a1", bad)
    assert not served.layers and not any("forward" in vars(m) for m in lm.model.modules())
    served.attach("a1", weights)  # the same name is still free
    assert len(served.layers) == len(weights)


def test_concurrent_loads_of_one_name_give_one_adapter_and_a_conflict(ws):
    """Invariant: two loads of one name sent together (both pass the event loop's name check) end with one
    adapter attached and registered, and the other load gets a 409-class error that changed nothing."""
    import asyncio

    from conftest import make_engine
    from saelora.serve.core.engine import EngineError

    engine = make_engine(ws)

    async def run():
        await engine.start()
        try:
            return await asyncio.gather(engine.load_adapter("x", "a1"), engine.load_adapter("x", "a2"),
                                        return_exceptions=True)
        finally:
            await engine.stop()

    results = asyncio.run(run())
    errors = [r for r in results if isinstance(r, BaseException)]
    assert len(errors) == 1 and isinstance(errors[0], EngineError) and errors[0].kind == "conflict", results
    assert list(engine.registry.entries) == ["x"]
    assert engine.lora.layers and all(list(layer.adapters) == ["x"] for layer in engine.lora.layers.values())


def test_last_tokens_latents_need_no_full_forward(ws):
    """Invariants: with latents on, every generated token's latents equal an encode-only pass over the whole
    text (no KV cache), the last token's included; and the step that only reads finished rows' last tokens
    stops at the deepest SAE: the LM head runs once per sampled token, never once more."""
    import asyncio

    from conftest import make_engine
    from saelora.adapters.splice import RowSpec
    from saelora.serve.core.engine import GenerationRequest, Sampling, TokenEvent

    engine = make_engine(ws, max_batch=4)
    heads = []
    engine.model.get_output_embeddings().register_forward_hook(lambda m, a, o: heads.append(1))
    prompts = [engine.tokenizer(p)["input_ids"] for p in ("the cat sat on", "a big red fox")]

    async def run():
        await engine.start()
        try:
            async def one(ids):
                heads.clear()
                req = GenerationRequest(ids, Sampling(max_tokens=5, temperature=0.0), RowSpec(top_k=3))
                evs = [ev async for ev in engine.generate(req) if isinstance(ev, TokenEvent)]
                assert len(heads) == 5  # the prefill + 4 decode steps; no sixth forward for the last latents
                return evs
            got = [await one(ids) for ids in prompts]
            refs = [await engine.encode(ids + [e.token_id for e in evs], 3, None, None)
                    for ids, evs in zip(prompts, got, strict=True)]
            return got, refs
        finally:
            await engine.stop()

    got, refs = asyncio.run(run())
    for ids, evs, ref in zip(prompts, got, refs, strict=True):
        assert len(evs) == 5
        for ev, want in zip(evs, ref[len(ids):], strict=True):
            (ia, va), (ib, vb) = next(iter(ev.features.values())), next(iter(want.features.values()))
            assert ia == ib and all(abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in zip(va, vb, strict=True))


@pytest.mark.parametrize("change", [{"lora_alpha": "sixteen"}, {"alpha_pattern": {"q_proj": "x"}},
                                    {"layers_to_transform": "x"}])
def test_a_bundle_peft_cannot_read_is_invalid_and_attaches_nothing(ws, change):
    """Invariant: a bundle that passes saelora's validation but whose config PEFT cannot turn into weights (a
    non-numeric alpha or alpha pattern, a layer filter that is not a list) is a 4xx 'invalid' error on load,
    never a server error, and leaves the engine as it was."""
    import asyncio
    import json
    import shutil
    from pathlib import Path

    from conftest import make_engine
    from saelora.serve.core.engine import EngineError

    name = "bad_" + "_".join(change)
    out = Path(ws["root"]) / name
    shutil.copytree(ws["a1"], out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
    engine = make_engine(ws)

    async def run():
        await engine.start()
        try:
            await engine.load_adapter("bad", name)
        finally:
            await engine.stop()

    try:
        with pytest.raises(EngineError) as err:
            asyncio.run(run())
    finally:
        shutil.rmtree(out)  # the adapter root is shared by the session's tests
    assert err.value.kind == "invalid" and err.value.param == "lora_path", err.value
    assert "cannot be read" in str(err.value)  # past saelora's validation, refused when read with PEFT's rules
    assert not engine.registry.entries and not engine.lora.layers


def test_the_registry_bounds_loaded_adapters_and_prunes_dead_servers_copies(tmp_path, monkeypatch):
    """A load beyond --max-adapters is a 409 before anything is read; a copies folder whose server process no
    longer runs is removed when the next registry starts, the running ones' are kept."""
    import os

    import torch

    from saelora.serve.core.engine import EngineError
    from saelora.serve.core.registry import AdapterRegistry

    monkeypatch.setenv("SAELORA_CACHE", str(tmp_path))
    copies = tmp_path / "served-adapters"
    (copies / "999999999").mkdir(parents=True)  # no such process
    (copies / str(os.getppid())).mkdir()  # a running process: kept
    reg = AdapterRegistry({}, [], torch.nn.Linear(1, 1), max_adapters=1)
    assert not (copies / "999999999").exists() and (copies / str(os.getppid())).exists()
    assert reg.copies == copies / str(os.getpid())
    reg.entries["a"] = object()
    with pytest.raises(EngineError) as err:
        reg.check_new("b")
    assert err.value.kind == "conflict" and "--max-adapters" in err.value.message
