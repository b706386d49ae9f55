"""Model loading: local HF folders, hub ids offline, bad specs (fast); the embedded model (slow)."""

import time

import pytest
import torch

from saelora.adapters.models import ModelLoadError, load_model
from tiny import tiny_llama, tiny_tokenizer


def test_local_hf_folder(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "m")
    tiny_tokenizer(["a b c"]).save_pretrained(tmp_path / "m")
    lm = load_model(str(tmp_path / "m"), device="cpu")
    ids = torch.tensor([[3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, model(ids).logits)
    assert lm.fingerprint["n_params"] == sum(p.numel() for p in model.state_dict().values())
    again = load_model(str(tmp_path / "m"), device="cpu")  # second load reuses the side-file fingerprint
    assert again.fingerprint == lm.fingerprint
    assert (tmp_path / "m" / "saelora_fingerprint.json").is_file()


def test_hub_id_offline_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(ModelLoadError, match="offline"):
        load_model("someone/some-model-that-is-not-cached", device="cpu")
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("spec,msg", [("not-a-model", "Unknown model"), ("/definitely/missing", "Unknown model")])
def test_bad_specs(spec, msg):
    with pytest.raises(ModelLoadError, match=msg):
        load_model(spec, device="cpu")


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")


def test_dequantising_opens_a_gguf_once_and_puts_the_reader_back(tmp_path):
    """transformers opens a GGUF three times per dequantisation; within `_one_gguf_reader` the three share one
    parsed reader, and afterwards (also after an error) `gguf.GGUFReader` is the real class again."""
    import gguf
    import numpy as np

    from saelora.adapters.models import _one_gguf_reader

    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("saelora.test", 7)
    w.add_tensor("t", np.arange(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    real = gguf.GGUFReader
    with _one_gguf_reader():
        a, b = gguf.GGUFReader(path), gguf.GGUFReader(str(tmp_path / "." / "t.gguf"))
        assert a is b and isinstance(a, real) and a.fields["saelora.test"].contents() == 7
    assert gguf.GGUFReader is real and gguf.GGUFReader(path) is not a
    with pytest.raises(RuntimeError), _one_gguf_reader():
        raise RuntimeError("the load failed")
    assert gguf.GGUFReader is real


# ---- slow tier: the real embedded model -----------------------------------------------------------

@pytest.fixture(scope="module")
def smollm():
    return load_model("smollm2-135m", device="cpu")


@pytest.mark.slow
def test_embedded_model_loads_from_cache(smollm):
    t0 = time.perf_counter()
    lm = load_model("smollm2-135m", device="cpu")
    assert time.perf_counter() - t0 < 30, "the second load must come from the fp32 cache"
    assert lm.fingerprint == smollm.fingerprint
    assert lm.model.dtype == torch.float32 and lm.model.config.num_hidden_layers == 30
    assert "models/smollm2-135m" in lm.path


@pytest.mark.slow
def test_embedded_model_knows_paris(smollm):
    tok = smollm.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = smollm.model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    completion = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert "Paris" in completion, completion


@pytest.mark.slow
def test_embedded_model_ce_on_embedded_corpus(smollm):
    from saelora.adapters.corpus import CorpusConfig, load_corpus

    corpus = load_corpus(smollm.tokenizer, CorpusConfig(seq_len=256))
    assert corpus.info["train_tokens"] > 900_000
    rows = corpus.val[:8]  # (8, 256)
    with torch.no_grad():
        logits = smollm.model(rows).logits  # (8, 256, V)
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1))
    assert torch.isfinite(ce) and ce.item() < 4.0, ce.item()


@pytest.mark.slow
def test_error_term_splice_reproduces_embedded_model(smollm):
    from saelora.adapters.saes import place_sae
    from saelora.adapters.splice_hooks import splice
    from tiny import make_sae

    s = place_sae(smollm.model, make_sae("topk", hook="model.layers.10", d_in=576, d_sae=1024), source="random")
    ids = smollm.tokenizer("Sparse autoencoders find features.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        base = smollm.model(ids).logits
        with splice(smollm.model, [s], mode="error_term", top_k=8):
            assert torch.equal(smollm.model(ids).logits, base)
        with splice(smollm.model, [s], mode="replace"):
            assert not torch.allclose(smollm.model(ids).logits, base, atol=1e-2)
