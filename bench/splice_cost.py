"""Where an SAE's reconstruction error costs cross-entropy: the splice taken apart by direction (issue 27: Gemma
3's demo SAE reconstructs at FVU 0.08 yet costs 0.72 nats spliced; SmolLM2's costs 0.11 at FVU 0.12).

For each model's demo SAE, on held-out rows of each genre (the bands the demo adapter was trained with), the
residual at the SAE's hook is replaced at the positions its policy splices by:
- `sae`: the reconstruction x_hat (the ordinary splice);
- `sae_norm_matched`: x_hat rescaled to the norm of x (no error in the residual's length);
- `sae_mean_dir_fixed`: x_hat with its error along the mean residual direction u removed (x_hat + ((x - x_hat).u) u);
- `mean_dir_error_only`: x plus only the error's component along u;
- `random_error`: x plus an error of the same norm per token in a random direction (the model's sensitivity to
  an error of that size, against which the SAE's own error is judged: Gurnee 2024, "SAE reconstruction errors
  are pathological");
- `sae_error_x0.71`, `sae_error_x0.5`: x plus the SAE's error scaled down, as an SAE with half or a quarter of
  the FVU and errors in the same directions would splice (what FVU would buy a given CE cost).
CE is over every position (kept positions count, as in `saelora eval`); u is the mean residual over the rows.

    python bench/splice_cost.py --model gemma3-270m --rows 32     # ~7 min: bench/results/splice_cost.json (merged)
    python bench/splice_cost.py --model smollm2-135m --rows 32    # ~3 min
    python bench/splice_cost.py --model M --rows 32 --genres wiki --variants sae_error_x0.71 sae_error_x0.5
    python bench/splice_cost.py --report                         # bench/results/splice_cost.md
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from saelora.adapters.genres import GENRE_NAMES

RESULTS = Path(__file__).parent / "results"
OUT = RESULTS / "splice_cost.json"
VARIANTS = ("base", "sae", "sae_norm_matched", "sae_mean_dir_fixed", "mean_dir_error_only", "random_error",
            "sae_error_x0.71", "sae_error_x0.5")
log = logging.getLogger("bench.splice_cost")


def _replace(variant: str, x, x_hat, u, gen):
    import torch

    err = x - x_hat
    if variant == "sae":
        return x_hat
    if variant.startswith("sae_error_x"):
        return x - float(variant.removeprefix("sae_error_x")) * err
    if variant == "sae_norm_matched":
        return x_hat * (x.norm(dim=-1, keepdim=True) / x_hat.norm(dim=-1, keepdim=True).clamp_min(1e-6))
    along = (err @ u)[..., None] * u
    if variant == "sae_mean_dir_fixed":
        return x_hat + along
    if variant == "mean_dir_error_only":
        return x - along
    r = torch.randn(x.shape, generator=gen, dtype=x.dtype)
    return x + r / r.norm(dim=-1, keepdim=True) * err.norm(dim=-1, keepdim=True)


def measure(lm, sae, rows, u, variants=VARIANTS) -> dict[str, float]:
    """Mean CE per token of `rows` under each variant (a forward hook on the SAE's decoder layer)."""
    import torch

    from saelora.adapters.hooks import decoder_layers

    point = sae.hook  # a HookPoint
    if point.kind != "post":
        raise SystemExit("only resid_post hooks are measured here")
    layer = decoder_layers(lm.model)[point.layer]
    out: dict[str, float] = {}
    for variant in variants:
        gen = torch.Generator().manual_seed(0)
        state: dict = {}

        def hook(module, args, output, variant=variant, gen=gen, state=state):
            h = output[0] if isinstance(output, tuple) else output
            x = h.float()
            pos = torch.arange(x.shape[1])[None, :].expand(x.shape[0], -1)
            spliced = ~sae.policy.keep_mask(pos, state["ids"], x)
            x_hat = sae.decode(sae.encode(x), x)
            new = torch.where(spliced[..., None], _replace(variant, x, x_hat, u, gen), x).to(h.dtype)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        handle = layer.register_forward_hook(hook) if variant != "base" else None
        total, n = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(rows), 8):
                ids = rows[i:i + 8]
                state["ids"] = ids
                logits = lm.model(input_ids=ids).logits[:, :-1].float()
                ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
                total, n = total + float(ce), n + ids[:, 1:].numel()
        if handle:
            handle.remove()
        out[variant] = total / n
        log.info("%s: %.4f", variant, out[variant])
    return out


def run(model: str, rows: int, genres: tuple[str, ...], variants: tuple[str, ...], sae_path: str | None = None,
        label: str | None = None) -> dict:
    import torch

    from saelora.adapters.config import demo_dir
    from saelora.adapters.corpus import CorpusConfig, load_corpus
    from saelora.adapters.models import load_model
    from saelora.adapters.saes import load_sae
    from saelora.adapters.steering import read_texts

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    lm = load_model(model)
    sae = load_sae(lm.model, sae_path or str(demo_dir(model) / "sae"), tokenizer=lm.tokenizer)
    key = label or model
    old = {r.get("label", r["model"]): r for r in (json.loads(OUT.read_text()) if OUT.is_file() else [])}
    result = old.get(key) or {"model": model, "label": key, "sae": sae.name, "sae_path": sae_path, "rows": rows,
                              "genres": {}}
    if result["rows"] != rows:
        raise SystemExit(f"{OUT} has {model} rows measured on {result['rows']} rows, not {rows}")
    for genre in genres:
        cfg = CorpusConfig(sources=(genre,), seq_len=128, val_fraction=0.03, test_fraction=0.07,
                           prepend_bos=sae.policy.prepend_bos)
        val = load_corpus(lm.tokenizer, cfg).val[:rows]
        texts = [lm.tokenizer.decode(r, skip_special_tokens=True) for r in val[:16]]
        u = read_texts(lm.model, lm.tokenizer, sae, texts, max_len=128).mean_residual()
        u = u / u.norm()
        ce = {**result["genres"].get(genre, {}).get("ce", {}), **measure(lm, sae, val, u, ("base", *variants))}
        result["genres"][genre] = {"tokens": int(val[:, 1:].numel()), "ce": ce,
                                   "cost": {v: ce[v] - ce["base"] for v in ce if v != "base"}}
    result["seconds"] = round(result.get("seconds", 0) + time.perf_counter() - t0, 1)
    old[key] = result
    OUT.write_text(json.dumps(list(old.values()), indent=1))
    return result


def report() -> None:
    lines = ["# Where the splice costs CE", "", "Written by `bench/splice_cost.py --report` (its docstring defines "
             "each variant). CE cost in nats per token over every position, against the base model; held-out rows "
             "of each genre; one SAE per model (the demo's).", ""]
    for r in json.loads(OUT.read_text()):
        lines += [f"## {r.get('label', r['model'])} ({r['sae']}, {r['rows']} rows of 128 tokens per genre, "
                  f"{r['seconds']:.0f} s)" + (f"; SAE {r['sae_path']}" if r.get("sae_path") else ""),
                  "", "| genre | base CE | " + " | ".join(VARIANTS[1:]) + " |",
                  "|---" * len(VARIANTS) + "|---|"]
        for g, c in r["genres"].items():
            lines.append(f"| {g} | {c['ce']['base']:.3f} | " + " | ".join(
                f"{c['cost'][v]:+.3f}" if v in c["cost"] else "-" for v in VARIANTS[1:]) + " |")
        lines.append("")
    (RESULTS / "splice_cost.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--genres", nargs="+", default=list(GENRE_NAMES))
    p.add_argument("--variants", nargs="+", default=list(VARIANTS[1:]), choices=VARIANTS[1:])
    p.add_argument("--sae", help="an SAE folder (default: the model's demo SAE)")
    p.add_argument("--label", help="the results entry's name (default: the model)")
    p.add_argument("--report", action="store_true")
    args = p.parse_args(argv)
    if not args.report:
        run(args.model, args.rows, tuple(args.genres), tuple(args.variants), args.sae, args.label)
    report()
    return 0


if __name__ == "__main__":
    sys.exit(main())
