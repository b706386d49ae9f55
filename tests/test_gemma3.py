"""Gemma 3 270M, the second embedded model, from tokens to served latents (slow tier: the real model).

Invariants named here:
- rows start with BOS, as Gemma's tokenizer does by default, and BOS stays original under the splice;
- `saelora eval`'s base CE equals plain transformers' loss on the same rows (and BOS matters: without it CE is
  far higher, 4.86 against 2.73 on Wikipedia);
- the chat template is Gemma's, with one BOS;
- train -> eval -> serve runs on a small budget, and the vLLM engine gives the torch engine's greedy text and
  latents.
"""

import pytest
import torch

pytestmark = pytest.mark.slow
HOOK = "blocks.7.hook_resid_post"


@pytest.fixture(scope="module")
def gemma():
    from saelora.adapters.models import load_model

    return load_model("gemma3-270m", device="cpu")


@pytest.fixture(scope="module")
def gemma_sae(tmp_path_factory):
    from tiny import make_sae, save_sae

    return str(save_sae(make_sae("topk", hook=HOOK, d_in=640, d_sae=1024, k=32),
                        tmp_path_factory.mktemp("g3") / "sae"))


def test_tokenizer_adds_bos_and_the_default_policy_keeps_it(gemma):
    from saelora.adapters.policy import default_policy

    tok = gemma.tokenizer
    assert tok("Hello world")["input_ids"][0] == tok.bos_token_id == 2
    policy = default_policy(tok)
    assert policy.prepend_bos and not policy.keep_first and tok.bos_token_id in policy.keep_token_ids
    assert gemma.model.config.model_type == "gemma3_text" and gemma.model.dtype == torch.float32


def test_chat_template_is_gemmas_with_one_bos(gemma):
    tok = gemma.tokenizer
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id


def test_eval_base_ce_equals_plain_transformers_with_bos(gemma, gemma_sae, tmp_path):
    from transformers import AutoModelForCausalLM

    from saelora.adapters.corpus import CorpusConfig, load_corpus
    from saelora.trainer.run_eval import EvalConfig, run_eval

    # the embedded corpus: the tests' cache holds no fetched genres (the default, mix, needs them)
    res = run_eval(EvalConfig(model="gemma3-270m", saes=[gemma_sae], corpus=["wiki"], rows=8, seq_len=128,
                              out=str(tmp_path / "eval.json")))["held-out"]
    rows = load_corpus(gemma.tokenizer, CorpusConfig(sources=("wiki",), seq_len=128, val_fraction=0.05,
                                                     prepend_bos=True)).val[:8]
    assert bool((rows[:, 0] == gemma.tokenizer.bos_token_id).all())
    plain = AutoModelForCausalLM.from_pretrained(gemma.path, dtype=torch.float32).eval()  # independent of saelora
    with torch.no_grad():
        ce = float(plain(input_ids=rows, labels=rows).loss)
        no_bos = float(plain(input_ids=rows[:, 1:], labels=rows[:, 1:]).loss)
    assert res["ce_base"] == pytest.approx(ce, abs=0.02)
    assert 2.0 < ce < 3.5 and no_bos > ce + 0.5, (ce, no_bos)
    assert "token ids [1, 2]" in res["positions"][HOOK] and "position 0" not in res["positions"][HOOK]


def test_train_eval_serve_on_a_small_budget(gemma, gemma_sae, tmp_path):
    import httpx

    from saelora.launch import ServeProcess
    from saelora.trainer.config import LoraSettings, TrainConfig
    from saelora.trainer.run_eval import EvalConfig, run_eval
    from saelora.trainer.train import train_lora

    bundle, final = train_lora(TrainConfig(model="gemma3-270m", saes=[gemma_sae], out=str(tmp_path / "run"),
                                           corpus=["wiki"],
                                           lora=LoraSettings(rank=4, layers="after"), lr=1e-3, max_steps=2,
                                           batch_size=1, seq_len=32,
                                           eval_interval=0, eval_rows=2, checkpoint_interval=0))
    assert final["tokens"] > 0 and final["ce_adapted"] == final["ce_adapted"]  # finite
    res = run_eval(EvalConfig(model="gemma3-270m", adapter=str(bundle), rows=2))["held-out"]
    assert res["ce_base"] < res["ce_spliced"]
    with ServeProcess(["--model", "gemma3-270m", "--sae", gemma_sae, "--adapter", f"ad={bundle}"],
                      log_path=str(tmp_path / "serve.log"), timeout=300) as srv:
        body = {"model": "ad", "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0,
                "sae": {"features": {"top_k": 3, "include_prompt": True}}}
        r = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        prompt = r.json()["choices"][0]["features"]["prompt"]
        assert prompt[0]["token_id"] == 2 and len(prompt) == 6  # the served prompt starts with BOS, as in training


@pytest.mark.integration
def test_vllm_engine_matches_torch_engine_on_gemma3(gemma, gemma_sae, tmp_path):
    from saelora.adapters.saes import load_sae
    from saelora.launch import ServeProcess
    from saelora.serve.api.app import create_app
    from saelora.serve.torch_engine import TorchEngine
    from server_util import LiveServer
    from test_vllm import assert_latents_close, complete

    engine = TorchEngine(gemma, [load_sae(gemma.model, gemma_sae, tokenizer=gemma.tokenizer)])
    args = ["--engine", "vllm", "--model", "gemma3-270m", "--sae", gemma_sae, "--served-model-name", "g3",
            "--kv-cache-gb", "1", "--max-loras", "0", "--enforce-eager"]
    # Eager: what is Gemma's here is its splice and BOS; compiling it cost CI 65 s, and the compiled path has its
    # own parity test (test_vllm.py::test_compiled_engine_matches_torch_engine_one_by_one_and_batched).
    with LiveServer(create_app(engine, served_name="g3")) as t, \
            ServeProcess(args, log_path=str(tmp_path / "vllm.log"), timeout=400) as v:
        for sae in (None, {"mode": "replace"}, {"edits": [{"feature": 5, "op": "set", "value": 40.0}]}):
            want = complete(t, "The capital of France is", "g3", sae, max_tokens=8, include_prompt=True)
            got = complete(v, "The capital of France is", "g3", sae, max_tokens=8, include_prompt=True)
            assert got["text"] == want["text"], (sae, got["text"], want["text"])
            assert_latents_close(got["features"]["prompt"], want["features"]["prompt"], 5e-3)
            assert_latents_close(got["features"]["generated"], want["features"]["generated"], 5e-3)
