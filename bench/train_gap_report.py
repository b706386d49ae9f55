"""The train_gap study's report: a markdown page that says what was measured and how it differs from the paper,
and a PNG of the learning-rate grids (validation) beside the test band's gap closed per arm."""

from __future__ import annotations

from pathlib import Path
from typing import Any

def _sae_metadata(folder: str) -> dict[str, Any]:
    """The SAE folder's recorded metadata (for results written before the summary kept a field), or {}."""
    import json

    cfg = Path(folder) / "cfg.json"
    return json.loads(cfg.read_text()).get("metadata", {}) if cfg.is_file() else {}


def differences(res: dict[str, Any]) -> str:
    """What differs from the paper (Chen, Engels, Tegmark 2025), for the model and SAE this run used."""
    st, sae = res["settings"], res["sae"]
    bos = (sae.get("saelora_policy") or {}).get("prepend_bos")
    tokens = sae.get("train_activations") or _sae_metadata(sae["folder"]).get("train_activations")
    rows = (f"- Rows of {st['seq_len']} tokens that start with BOS (the model needs it); saelora's policy keeps BOS, "
            "the special ids and massive activations original, as SAELens keeps special tokens." if bos else
            f"- Rows of {st['seq_len']} tokens without BOS (the model adds none), so under saelora's policy position "
            "0 (the attention sink), the BOS/EOS ids and massive activations stay original; the SAELens column "
            "splices the sink too.")
    return "\n".join([
        "What differs from the paper (Chen, Engels, Tegmark 2025):",
        f"- Model: {st['model']} on 2 CPU cores; the paper uses Gemma-2-2B, Llama-3.2-1B and Llama-3.1-8B on GPUs.",
        f"- SAE: a TopK SAE at `{sae['hook']}` ({sae['d_sae']} latents, k {sae['k']}) trained here on "
        f"{'~%.1fM' % (tokens / 1e6) if tokens else 'an unrecorded number of'} tokens of the embedded mixture "
        "(Wikipedia leads, technical prose, narrative text); the paper adapts SAEs trained on hundreds of millions "
        "of tokens of RedPajama.",
        "- Tokens: each run trains on tens of thousands of tokens (minutes); the paper trains LoRA on ~15M+ tokens.",
        rows,
        "- The SAE KL + MSE arm weighs the terms equal at the start; the paper's e2e baselines differ in detail.", ""])


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.1%}"


def _ci(s: dict[str, Any]) -> str:
    lo, hi = s["gap_closed_ci"]
    return f"{_pct(s['gap_closed'])} [{lo:.1%}, {hi:.1%}]"


def _test_rows(t: dict[str, Any]) -> list[str]:
    rows = ["| arm | lr | gap closed, seed mean [95% CI over rows] | per seed | spread | SAELens convention, "
            "seed mean | drift: CE adapter alone - base, KL |", "|---|---|---|---|---|---|---|"]
    for arm, a in t["arms"].items():
        mine, sl = a["saelora"], a["saelens"]
        seeds = [s["gap_closed"] for s in mine["per_seed"]]
        drift = "" if not a["drift"] else ", ".join(
            f"{d['ce_adapter_only'] - d['ce_base']:+.4f} / {d['kl_adapter_only']:.4f}" for d in a["drift"])
        rows.append(f"| {arm} | {a['lr']:g} | **{_ci(mine['mean'])}** | {' / '.join(_pct(g) for g in seeds)} | "
                    f"{(max(seeds) - min(seeds)) * 100:.1f} pts | {_ci(sl['mean'])} | {drift or 'model unchanged'} |")
    return rows


def _grid_rows(res: dict[str, Any]) -> list[str]:
    rows = ["| arm | lr | seed | train min | tokens | validation CE | validation gap closed |",
            "|---|---|---|---|---|---|---|"]
    for arm, a in res["arms"].items():
        seen = set()
        for r in a["grid"] + a["chosen"]:
            if (r["lr"], r["seed"]) in seen:
                continue
            seen.add((r["lr"], r["seed"]))
            mark = " (chosen)" if r["lr"] == a["lr"] else ""
            rows.append(f"| {arm} | {r['lr']:g}{mark} | {r['seed']} | {r['train_s'] / 60:.1f} | {r['tokens']} | "
                        f"{r['val_ce']:.4f} | {_pct(r['val_gap_closed'])} |")
    return rows


def _scratch_rows(s: dict[str, Any] | None) -> list[str]:
    if not s:
        return ["Not run in this pass (`--stages scratch`); the v1 figure and its caveats are in "
                "`bench/results/history/train_gap_v1.md`."]
    rows = [f"Protocol {s['protocol']} (bench/train_gap_scratch.py). TopK SAE from scratch, checkpoints each "
            f"followed by LoRA (layers after, lr {s['lora_lr']:g}); e2e SAEs from scratch at "
            f"{', '.join(str(b['steps']) for b in s['e2e'])} steps, each budget's rate chosen on validation "
            f"(initialisation {s['init_seconds']:.0f} s, counted). Time is total wall time on 2 CPU cores, SAE "
            "training included; CE on the validation rows of the runs' evals.", "",
            "| target CE (an e2e budget's final) | e2e: s / tokens / steps | TopK + LoRA: s / tokens / steps | "
            "speed-up |", "|---|---|---|---|"]
    for r in s["speedups"]:
        cells = ["never" if p is None else f"{p[0]:.0f} / {p[1]} / {p[2]}" for p in (r["e2e"], r["topk_lora"])]
        rows.append(f"| {r['target_ce']:.4f} | {cells[0]} | {cells[1]} | {r['speedup'] or 'n/a'} |")
    rows += ["", "| from scratch | time (s) | test CE |", "|---|---|---|"]
    for t in s["topk"]:
        rows.append(f"| TopK at {t['fraction']:g} of training, spliced / + LoRA | {t['seconds']:.0f} / "
                    f"{t['curve'][-1][0]:.0f} | {t['test_ce']['spliced']:.4f} / {t['test_ce']['lora']:.4f} |")
    for b in s["e2e"]:
        grid = ", ".join(f"{r['lr']:g}" for r in b["runs"])
        edge = " (at the grid's edge)" if b.get("at_edge") else ""
        rows.append(f"| e2e {b['steps']} steps, lr {b['lr']:g}{edge} of {grid} | {b['curve'][-1][0]:.0f} | "
                    f"{b['test_ce']:.4f} |")
    return rows


def _reused(res: dict[str, Any]) -> str:
    n = len(res.get("reused_runs", []))
    return f", reusing {n} finished run{'s' * (n != 1)} of an earlier invocation, whose training time is not in it" \
        if n else ""


def write_md(res: dict[str, Any], path: Path) -> None:
    st, sae, v, t = res["settings"], res["sae"], res["validation"], res["test"]
    fvu = "unrecorded" if sae.get("fvu") is None else f"{sae['fvu']:.3f}"
    edges = [arm for arm, a in res["arms"].items() if a["at_edge"]]
    lines = [
        "# train_gap (v2 protocol): LoRA around a frozen SAE, against SAE fine-tuning", "",
        f"Rerun: `{res.get('command', 'python bench/train_gap.py')}` ({res['wall_minutes']} min here"
        f"{_reused(res)}; every run as it finished: "
        f"`{st['stem']}_runs.json`; the choices, frozen before the test band was read: `{st['stem']}_choices.json`). "
        f"SAE `{Path(sae['folder']).name}` at `{sae['hook']}`: d_sae {sae['d_sae']}, k {sae['k']}, held-out FVU "
        f"{fvu}; policy {sae['saelora_policy']}. Corpus {st['corpus']}.", "",
        f"Budget per run: {st['run_steps']} steps of {st['batch_size']} x {st['seq_len']} tokens, "
        f"{st['warmup_steps']} warm-up steps then cosine decay; LoRA rank {st['rank']}; SAE KL + MSE weight "
        f"{res['mse_weight']:.3g}. Choices on {v['rows']} validation rows ({v['tokens']} tokens; base CE "
        f"{v['ce_base']:.4f}, spliced {v['ce_spliced']:.4f}). Grids with seed 0, the chosen rate with "
        f"{st['seeds']} seeds. Chosen rate at a grid edge: {', '.join(edges) or 'none'}.", ""]
    if t:
        cs = t["ce_spliced"]
        lines += [f"## The test band, read once ({t['rows']} rows, {t['tokens']} tokens; documents no run trained "
                  "on and no choice saw)", "",
                  f"CE base {t['ce_base']:.4f}; spliced {cs['saelora']:.4f} under saelora's policy (gap "
                  f"{cs['saelora'] - t['ce_base']:.4f} nats), {cs['saelens']:.4f} under SAELens's convention (gap "
                  f"{cs['saelens'] - t['ce_base']:.4f}).", "", *_test_rows(t), ""]
    lines += ["## Every run (validation)", "", *_grid_rows(res), "",
              "## The paper's comparison: from scratch, total wall time", "", *_scratch_rows(res["from_scratch"]), "",
              differences(res), "![learning-rate grids and test gap closed](" + path.with_suffix(".png").name + ")"]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Rewrite the page and the plot from a results JSON: `python bench/train_gap_report.py RESULTS.json`."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("results", type=Path)
    path = p.parse_args(argv).results
    res = json.loads(path.read_text())
    write_md(res, path.with_suffix(".md"))
    plot(res, path.with_suffix(".png"))
    return 0


def plot(res: dict[str, Any], png: Path) -> None:
    """When arms ran: validation gap closed against the learning rate per arm (the grids), and the test band's
    gap closed per arm (seed mean with its interval, each seed). When the from-scratch comparison ran: its CE
    against total time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scratch, arms = res.get("from_scratch"), bool(res["arms"])
    n = max(1, 2 * arms + bool(scratch))
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 5), squeeze=False)
    if arms:
        _plot_grids(axes[0][0], axes[0][1], res)
    if scratch:
        _plot_scratch(axes[0][-1], scratch)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def _plot_grids(ax: Any, bx: Any, res: dict[str, Any]) -> None:
    """Validation gap closed against the learning rate per arm; the test band's gap closed per arm."""
    for arm, a in res["arms"].items():
        ax.plot([r["lr"] for r in a["grid"]], [100 * r["val_gap_closed"] for r in a["grid"]], "o-", ms=4, label=arm)
    ax.set(xscale="log", xlabel="learning rate", ylabel="gap closed on validation (%)",
           title="learning-rate grids (seed 0)")
    ax.legend(fontsize=8)
    t = res["test"]
    if t:
        for i, a in enumerate(t["arms"].values()):
            m, seeds = a["saelora"]["mean"], [100 * s["gap_closed"] for s in a["saelora"]["per_seed"]]
            g, (lo, hi) = 100 * m["gap_closed"], m["gap_closed_ci"]
            bx.errorbar([i], [g], yerr=[[g - 100 * lo], [100 * hi - g]], fmt="s", capsize=4, color="C0")
            bx.plot([i] * len(seeds), seeds, "x", color="C1")
        bx.set_xticks(range(len(t["arms"])), list(t["arms"]))
        bx.axhline(30, color="k", ls=":", label="target 30%")
        bx.set(ylabel="gap closed on the test band (%)", title="test band: seed mean, 95% CI over rows; x: seeds")
        bx.legend(fontsize=8)


def _plot_scratch(cx: Any, s: dict[str, Any]) -> None:
    """Validation CE against total wall time: every TopK checkpoint + LoRA, every e2e budget; the speed-up levels."""
    for t in s["topk"]:
        cx.plot([p[0] / 60 for p in t["curve"]], [p[3] for p in t["curve"]], "s-", ms=3,
                label=f"TopK at {t['fraction']:g} + LoRA")
    for b in s["e2e"]:
        cx.plot([p[0] / 60 for p in b["curve"]], [p[3] for p in b["curve"]], "^--", ms=3,
                label=f"e2e {b['steps']} steps (lr {b['lr']:g})")
    for r in s["speedups"]:
        cx.axhline(r["target_ce"], color="grey", lw=0.5, ls=":")
    cx.set(xlabel="total wall time (min, 2 CPU cores, SAE training included)", ylabel="validation CE",
           title="from scratch: CE against total time")
    cx.legend(fontsize=7)


if __name__ == "__main__":
    raise SystemExit(main())
