"""`saelora features`: what each SAE latent responds to, over a corpus, optionally under an adapter.

Per latent: the top-activating contexts (token, text around it, activation), activation density, max and
decoder-row norm; plus the dead latents and the median residual norm at the hook (the scales of calibrated
steering units, adapters/units.py). Written as `features.json` and a static `index.html` (searchable by feature
index and by token) per SAE. The server serves these descriptions at /v1/saes/{id}/features/{index}.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from saelora.adapters.activations import run_to_hook
from saelora.adapters.config import DEFAULT_CORPUS, DEFAULT_MODEL, FEATURES_FILE, descriptions_dir
from saelora.adapters.errors import ConfigError
from saelora.adapters.logit_lens import top_logits
from saelora.adapters.saes import LoadedSAE
from saelora.adapters.steering import decoder_norms

from .config import opt

log = logging.getLogger(__name__)


@dataclass
class FeaturesConfig:
    model: str = opt(DEFAULT_MODEL, "base model spec")
    saes: list[str] = opt(factory=list, help="sae-lens folders")
    adapter: str | None = opt(None, "adapter bundle to apply before reading latents (changes them with layers=all)")
    corpus: list[str] = opt(factory=lambda: [DEFAULT_CORPUS], help="corpus sources to scan")
    rows: int = opt(256, "corpus rows to scan (validation split first, then train)")
    seq_len: int = opt(128, "tokens per row")
    batch_size: int = opt(16, "rows per forward")
    top_n: int = opt(10, "contexts kept per latent")
    context_left: int = opt(12, "tokens shown before the activating token")
    context_right: int = opt(4, "tokens shown after it")
    logit_top: int = opt(10, "tokens each latent promotes / suppresses most (decoder row -> final norm -> unembedding)")
    policy: str | None = opt(None, "position-policy override (default: the SAE's; positions it keeps are never shown)")
    out: str | None = opt(None, "default: <sae folder>/features")
    device: str | None = opt(None, "default: cuda if available, else cpu")


# Activation histogram bins, the same for every latent: bin j holds HIST_EDGES[j-1] <= value < HIST_EDGES[j] (bin 0:
# above 0 and below the first edge; the last: from the last edge up), half-octave steps from 1/16 to 4096.
HIST_EDGES = [2.0 ** (k / 2) for k in range(-8, 25)]
HIST_BINS = len(HIST_EDGES) + 1


class TopContexts:
    """Running top-n (value, row, position) per latent over batches of latents (B, T, S), with each latent's
    density, max and a histogram of its non-zero activations (HIST_EDGES)."""

    def __init__(self, d_sae: int, top_n: int) -> None:
        self.values = torch.full((top_n, d_sae), -float("inf"))
        self.where = torch.zeros((top_n, d_sae), dtype=torch.long)  # flat index row * T + position
        self.active = torch.zeros(d_sae, dtype=torch.long)
        self.max = torch.zeros(d_sae)
        self.tokens = 0
        self.edges = torch.tensor(HIST_EDGES)
        self.hist = torch.zeros(d_sae * HIST_BINS, dtype=torch.long)  # (S, bins), flat

    def histogram(self, j: int) -> dict[str, Any]:
        """Latent j's histogram, trimmed to its non-empty range: counts of bins lo, lo + 1, ..."""
        counts = self.hist.view(-1, HIST_BINS)[j]
        nz = counts.nonzero()
        if not len(nz):
            return {"lo": 0, "counts": []}
        lo, hi = int(nz[0]), int(nz[-1])
        return {"lo": lo, "counts": counts[lo:hi + 1].tolist()}

    def update(self, z: torch.Tensor, row_offset: int, counted: int | None = None) -> None:
        """z (B, T, S) latents (zero where not counted); counted: tokens that count (default B * T)."""
        b, t, s = z.shape
        flat = z.reshape(b * t, s).float().cpu()  # (N, S)
        self.active += (flat > 0).sum(0)
        rows, cols = (flat > 0).nonzero(as_tuple=True)
        bins = torch.bucketize(flat[rows, cols], self.edges, right=True)
        self.hist.scatter_add_(0, cols * HIST_BINS + bins, torch.ones_like(bins))
        self.max = torch.maximum(self.max, flat.max(0).values)
        self.tokens += b * t if counted is None else counted
        k = min(self.values.shape[0], b * t)
        v, i = flat.topk(k, dim=0)  # (k, S)
        vals = torch.cat([self.values, v])
        where = torch.cat([self.where, i + row_offset * t])
        top = vals.topk(self.values.shape[0], dim=0)
        self.values, self.where = top.values, torch.gather(where, 0, top.indices)


def _context(tokenizer: Any, rows: torch.Tensor, flat_idx: int, cfg: FeaturesConfig) -> dict[str, Any]:
    t = rows.shape[1]
    r, p = divmod(flat_idx, t)
    ids = rows[r].tolist()
    return {"row": r, "position": p, "token": tokenizer.decode([ids[p]]),
            "left": tokenizer.decode(ids[max(0, p - cfg.context_left):p]),
            "right": tokenizer.decode(ids[p + 1:p + 1 + cfg.context_right])}


def describe_features(model: torch.nn.Module, tokenizer: Any, sae: LoadedSAE, rows: torch.Tensor,
                      cfg: FeaturesConfig) -> dict[str, Any]:
    """Scan `rows` (N, T) and describe every latent of `sae`."""
    acc = TopContexts(sae.d_sae, cfg.top_n)
    norms = []
    with torch.no_grad():
        for i in tqdm(range(0, len(rows), cfg.batch_size), desc=f"features {sae.name}", disable=None):
            ids = rows[i:i + cfg.batch_size]
            x = run_to_hook(model, sae.hook, ids)  # (b, T, d)
            z = sae.encode(x)  # (b, T, d_sae)
            keep = sae.policy.keep_in_rows(ids, x)
            z[keep] = 0  # positions the SAE is not spliced at (attention sink, BOS/EOS) describe nothing
            acc.update(z, i, counted=int((~keep).sum()))
            norms.append(x[~keep].float().norm(dim=-1).cpu())
    rows_cpu = rows.cpu()
    writes = top_logits(model, sae, cfg.logit_top)  # what each latent writes to the logits (adapters/logit_lens.py)
    features = []
    dec_norms = decoder_norms(sae)
    for j in range(sae.d_sae):
        top = [dict(_context(tokenizer, rows_cpu, int(acc.where[n, j]), cfg), value=round(float(acc.values[n, j]), 4))
               for n in range(acc.values.shape[0]) if acc.values[n, j] > 0]
        logits = {side: [{"token": tokenizer.decode([i]), "token_id": i, "value": round(v, 4)} for i, v in pairs]
                  for side, pairs in zip(("promoted", "suppressed"), writes[j], strict=True)}
        features.append({"index": j, "density": float(acc.active[j]) / acc.tokens, "max": float(acc.max[j]),
                         "dec_norm": round(dec_norms[j], 6), "top": top, "logits": logits, "hist": acc.histogram(j)})
    dead = [f["index"] for f in features if not f["top"]]
    # resid_norm and dec_norm are the scales of calibrated steering units (adapters/units.py)
    return {"sae": sae.describe(), "tokens": acc.tokens, "dead": dead, "hist_edges": HIST_EDGES,
            "resid_norm": float(torch.cat(norms).median()) if norms else 0.0, "features": features}


_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body{{font-family:sans-serif;margin:2em}} .f{{border-top:1px solid #ccc;padding:.4em 0}} b.tok{{background:#fd6}}
.ctx{{font-family:monospace;white-space:pre-wrap;margin:.1em 0}} input{{font-size:1em;margin:.2em}}
</style></head><body><h1>{title}</h1><p>{summary}</p>
<input id="idx" placeholder="feature index"><input id="tok" placeholder="token (e.g. Paris)">
<div id="list"></div><script>
const DATA = {data};
function show() {{
  const i = document.getElementById('idx').value.trim(), t = document.getElementById('tok').value.trim();
  const out = [];
  for (const f of DATA.features) {{
    if (i !== '' && String(f.index) !== i) continue;
    if (t !== '' && !f.top.some(c => c.token.trim() === t)) continue;
    if (!f.top.length) continue;
    const ctx = c => `<div class="ctx">${{c.value.toFixed(2)}}  ${{esc(c.left)}}` +
      `<b class="tok">${{esc(c.token)}}</b>${{esc(c.right)}}</div>`;
    const toks = side => (f.logits ? f.logits[side] : []).map(t => esc(JSON.stringify(t.token))).join(' ');
    out.push(`<div class="f"><b>#${{f.index}}</b> density ${{f.density.toExponential(2)}} max ${{f.max.toFixed(2)}}` +
      `<div class="ctx">promotes ${{toks('promoted')}}<br>suppresses ${{toks('suppressed')}}</div>` +
      f.top.map(ctx).join('') + '</div>');
    if (out.length >= 200) break;
  }}
  document.getElementById('list').innerHTML = out.join('') || 'no match';
}}
function esc(s) {{ return s.replace(/[&<>]/g, c => ({{'&':'&amp;','<':'&lt;','>':'&gt;'}}[c])); }}
document.getElementById('idx').oninput = show; document.getElementById('tok').oninput = show; show();
</script></body></html>"""


def write_features(result: dict[str, Any], out: Path) -> Path:
    """features.json and a static searchable index.html in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / FEATURES_FILE).write_text(json.dumps(result))
    s = result["sae"]
    summary = (f"{html.escape(s['source'])} at {s['hook']}: {s['d_sae']} latents, {len(result['dead'])} dead "
               f"on {result['tokens']} tokens")
    page = _PAGE.format(title=html.escape(f"SAE features: {s['name']}"), summary=summary,
                        data=json.dumps(result).replace("</", "<\\/"))
    (out / "index.html").write_text(page)
    return out


def run_features(cfg: FeaturesConfig) -> list[Path]:
    """Describe the latents of each SAE in `cfg.saes`; returns the output folders."""
    from saelora.adapters.bundle import attach_bundle, load_bundle
    from saelora.adapters.corpus import CorpusConfig, load_corpus
    from saelora.adapters.models import load_model
    from saelora.adapters.policy import corpus_bos
    from saelora.adapters.saes import load_sae

    if not cfg.saes:
        raise ConfigError("at least one SAE is needed (--sae PATH)")
    lm = load_model(cfg.model, device=cfg.device)
    saes = [load_sae(lm.model, s, tokenizer=lm.tokenizer, policy=cfg.policy) for s in cfg.saes]
    model = lm.model
    if cfg.adapter:
        model = attach_bundle(model, load_bundle(cfg.adapter, lm.fingerprint, saes), "adapter")
    corpus = load_corpus(lm.tokenizer, CorpusConfig(sources=tuple(cfg.corpus), seq_len=cfg.seq_len,
                                                    prepend_bos=corpus_bos([s.policy for s in saes])))
    rows = torch.cat([corpus.val, corpus.train])[: cfg.rows].to(next(model.parameters()).device)
    outs = []
    for spec, sae in zip(cfg.saes, saes, strict=True):
        result = describe_features(model, lm.tokenizer, sae, rows, cfg)
        result["config"] = asdict(cfg)
        out = descriptions_dir(spec) if not cfg.out else Path(cfg.out) / sae.name if len(saes) > 1 else Path(cfg.out)
        outs.append(write_features(result, out))
        log.info("features of %s written to %s (%d dead of %d)", sae.name, out, len(result["dead"]), sae.d_sae)
    return outs
