"""Tiny random models and SAEs for the fast test tier (built in-process, no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch

D_MODEL = 32
VOCAB = 96


def tiny_llama(n_layers: int = 3, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=64, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(n_layers: int = 3, seed: int = 0) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=D_MODEL, n_layer=n_layers, n_head=4, n_positions=256,
                     bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def make_sae(arch: str = "standard", hook: str = "blocks.1.hook_resid_post", d_in: int = D_MODEL,
             d_sae: int = 64, seed: int = 0, **extra):
    """A sae-lens SAE of `arch` with random weights that leave a useful fraction of latents active."""
    import sae_lens
    from sae_lens.saes.sae import SAEMetadata

    classes = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
               "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
               "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
               "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig)}
    sae_cls, cfg_cls = classes[arch]
    if arch == "topk":
        extra.setdefault("k", 8)
    torch.manual_seed(seed)
    cfg = cfg_cls(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook, model_name="tiny"), **extra)
    sae = sae_cls(cfg)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name.startswith("b_"):
                p.normal_(0, 0.1)
        if arch == "jumprelu":
            sae.threshold.fill_(0.05)
    return sae.eval().requires_grad_(False)


def save_sae(sae, folder: Path) -> Path:
    sae.save_model(folder)
    return folder


def tiny_tokenizer(texts: list[str]):
    """A word-level fast tokenizer trained on `texts`, with <unk>, <pad> and <eos>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<eos>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}assistant :{% endif %}")
    return fast


WORDS = ("the cat dog sat ran on under a mat log big small red blue quick slow fox jumps over lazy bird "
         "sings in tree river flows to sea sun rises east sets west moon night day bright dark").split()


def tiny_text_corpus(n_docs: int = 300, seed: int = 0) -> list[str]:
    """Random short documents over a 40-word vocabulary, with some repeated structure."""
    import random

    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        start = rng.randrange(len(WORDS))
        stride = rng.choice([1, 1, 2, 3])
        docs.append(" ".join(WORDS[(start + stride * i) % len(WORDS)] for i in range(rng.randint(8, 40))))
    return docs


FAMILIES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "mistral")


def tiny_config(family: str, vocab: int, d_model: int, n_heads: int, n_layers: int, tok) -> object:  # noqa: ANN001
    """A small random config of one decoder family (head size d_model / n_heads, set explicitly)."""
    import transformers

    cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config", "gemma": "GemmaConfig",
           "gemma2": "Gemma2Config", "gemma3": "Gemma3TextConfig", "mistral": "MistralConfig"}[family]
    extra = {"head_dim": d_model // n_heads} if family in ("qwen3", "gemma", "gemma2", "gemma3", "mistral") else {}
    if family in ("gemma2", "gemma3"):
        extra.update(sliding_window=64, query_pre_attn_scalar=d_model // n_heads)
    if family == "gemma3":  # Gemma 3's pattern: sliding-window layers with a full-attention one among them
        extra.update(layer_types=["sliding_attention"] * (n_layers - 1) + ["full_attention"])
    return getattr(transformers, cls)(
        vocab_size=vocab, hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
        num_attention_heads=n_heads, num_key_value_heads=n_heads // 2, max_position_embeddings=256,
        bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.2,
        tie_word_embeddings=family.startswith("gemma"), **extra)  # gemma always ties (vLLM assumes it)


def tiny_workspace(root: Path, n_layers: int = 3,
                   saes: tuple[tuple[str, str], ...] = (("topk", "blocks.1.hook_resid_post"),),
                   d_model: int = D_MODEL, n_heads: int = 4, family: str = "llama") -> dict:
    """A tiny HF model folder (vocabulary fitted to a tiny tokenizer), SAE folders and a .jsonl corpus.
    (vLLM's CPU attention needs head sizes that are multiples of 32: d_model=128, n_heads=4.)"""
    import json

    from transformers import AutoModelForCausalLM

    docs = tiny_text_corpus()
    tok = tiny_tokenizer(docs)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(family, len(tok), d_model, n_heads, n_layers, tok))
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    folders = []
    for i, (arch, hook) in enumerate(saes):
        folders.append(str(save_sae(make_sae(arch, hook=hook, d_in=d_model, seed=i), root / f"sae{i}")))
    (root / "corpus.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    return {"model": str(root / "model"), "saes": folders, "corpus": str(root / "corpus.jsonl")}


def make_bundle(ws: dict, out: Path, seed: int = 0, rank: int = 4, scale: float = 0.3) -> Path:
    """A real adapter bundle for the tiny workspace's model and first SAE, with random (non-zero) LoRA weights."""
    from saelora.adapters.bundle import BundleManifest, save_bundle
    from saelora.adapters.models import load_model
    from saelora.adapters.saes import load_sae
    from saelora.trainer.lora import LoraSettings, add_lora

    lm = load_model(ws["model"], device="cpu")
    sae = load_sae(lm.model, ws["saes"][0], tokenizer=lm.tokenizer)
    peft = add_lora(lm.model, LoraSettings(rank=rank), [sae.hook])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    manifest = BundleManifest(base_model={"spec": ws["model"], "fingerprint": lm.fingerprint}, saes=[sae.describe()],
                              metrics={"final": {"gap_closed": 0.5}})
    return save_bundle(out, peft, manifest)
