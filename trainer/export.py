"""`saelora export --merge ADAPTER OUT`: an adapter bundle merged into its base model, written as a plain
Hugging Face checkpoint that any tool loads (transformers, lm-eval's `hf` model, vLLM without LoRA).

The bundle is validated against the base model it names (its manifest's fingerprint) before anything is
written; PEFT merges the LoRA weights (`merge_and_unload`), and the folder gets the model, its tokenizer and
`saelora_export.json` (the source bundle's manifest and what was done). The SAE splice is not part of the
checkpoint and cannot be: it is a reconstruction inside the residual stream at one layer, with its position
policy, which no plain checkpoint expresses. Serve the bundle and use the `<adapter>+sae` model name for the
adapted spliced model (docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from saelora.adapters.options import opt

log = logging.getLogger(__name__)
EXPORT_MANIFEST = "saelora_export.json"


@dataclass
class ExportConfig:
    merge: str = opt(help="the adapter bundle to merge into its base model")
    out: str = opt(help="folder for the merged checkpoint (created; must not hold files)")
    model: str | None = opt(None, help="the base model (default: the one the bundle's manifest names)")


def export_merged(cfg: ExportConfig) -> Path:
    """Merge bundle `cfg.merge` into its base model and save it to `cfg.out`; returns the folder."""
    import torch
    from peft import PeftModel

    from saelora.adapters.bundle import load_bundle, read_manifest
    from saelora.adapters.errors import ConfigError
    from saelora.adapters.models import load_model

    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} is not empty: export writes a fresh folder")
    manifest = read_manifest(cfg.merge)
    lm = load_model(cfg.model or manifest.base_model["spec"], device="cpu")
    bundle = load_bundle(cfg.merge, lm.fingerprint, model=lm.model)  # refuses a bundle of another model
    with torch.no_grad():
        merged = PeftModel.from_pretrained(lm.model, str(bundle.path)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out, safe_serialization=True)
    lm.tokenizer.save_pretrained(out)
    record = {"merged_from": str(bundle.path.resolve()), "base_model": lm.spec, "bundle": dataclasses.asdict(manifest),
              "spliced": False, "note": "LoRA merged into the base weights; the SAE splice is not in this checkpoint "
                                        "(serve the bundle and use the <adapter>+sae model name)"}
    (out / EXPORT_MANIFEST).write_text(json.dumps(record, indent=1))
    log.info("merged %s into %s: %s", bundle.path, lm.spec, out)
    return out
