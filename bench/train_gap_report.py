"""The train_gap study's report: a markdown page that says what was measured and how it differs from the paper,
and a PNG of the validation gap closed against training time, and of the from-scratch comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DIFFERENCES = """\
What differs from the paper (Chen, Engels, Tegmark 2025):
- Model: SmolLM2-135M-Instruct (30 layers, d_model 576) on 2 CPU cores; the paper uses Gemma-2-2B,
  Llama-3.2-1B and Llama-3.1-8B on GPUs.
- SAE: one TopK SAE at layer 12 trained here on ~0.9M Wikipedia tokens (3 epochs); the paper adapts
  pretrained or self-trained SAEs trained on hundreds of millions of tokens.
- Tokens: each run trains for minutes (tens of thousands of tokens); the paper trains LoRA on ~15M+ tokens.
- Data: Wikipedia lead sections (embedded corpus), rows of 128 tokens without BOS; SmolLM2 adds no BOS,
  so position 0 (the attention sink) and the BOS/EOS ids are left original under the policy.
- The e2e-from-scratch arm optimises KL only (no downstream MSE terms) at the budget stated.
"""


def _pct(x: float | None) -> str:
    return "" if x is None else f"{x:.1%}"


def _arm_rows(res: dict[str, Any]) -> list[str]:
    rows = ["| arm | lr (chosen on validation) | test CE, seed 0 / 1 | gap closed, seed 0 / 1 | mean | spread |",
            "|---|---|---|---|---|---|"]
    for arm, a in res["arms"].items():
        ce = " / ".join(f"{c:.4f}" for c in a["test_ce_seeds"])
        gaps = " / ".join(_pct(g) for g in a["gap_closed_seeds"])
        rows.append(f"| {arm} | {a['lr']:g} | {ce} | {gaps} | {_pct(a['gap_closed_mean'])} | "
                    f"{a['gap_closed_spread'] * 100:.1f} pts |")
    return rows


def _sweep_rows(res: dict[str, Any]) -> list[str]:
    rows = ["| arm | lr | seed | steps | train min | validation CE | validation KL | validation gap closed |",
            "|---|---|---|---|---|---|---|---|"]
    for arm, a in res["arms"].items():
        for r in a["runs"]:
            rows.append(f"| {arm} | {r['lr']:g} | {r['seed']} | {r['steps']} | {r['val_curve'][-1][0] / 60:.1f} | "
                        f"{r['val_ce']:.4f} | {r['val_kl']:.4f} | {_pct(r['val_gap_curve'][-1][1])} |")
    return rows


def _scratch_rows(s: dict[str, Any] | None) -> list[str]:
    if not s:
        return ["(from-scratch comparison skipped)"]
    reach = s["topk_lora_seconds_to_e2e_final"]
    return [
        f"- TopK SAE from scratch (MSE): {s['topk_sae_seconds'] / 60:.1f} min including activation collection; "
        f"then LoRA (layers after) for {s['lora']['val_curve'][-1][0] / 60:.1f} min.",
        f"- e2e SAE from scratch (KL): {s['e2e_steps']} steps; final validation CE "
        f"{s['e2e_final_val_ce']:.4f}, reached at {s['e2e_seconds_to_final'] / 60:.1f} min.",
        f"- TopK + LoRA reach that CE at {'never' if reach is None else f'{reach / 60:.1f} min'} "
        f"(total wall time, SAE training included): **speed-up {s['speedup']}**.",
        f"- Test CE: e2e {s['test_ce']['e2e']:.4f}, TopK spliced {s['test_ce']['topk_spliced']:.4f}, "
        f"TopK + LoRA {s['test_ce']['topk_lora']:.4f}.",
    ]


def write_md(res: dict[str, Any], path: Path) -> None:
    st, sae = res["settings"], res["sae"]
    fvu = "unrecorded" if sae.get("fvu") is None else f"{sae['fvu']:.3f}"
    lines = [
        "# train_gap: LoRA around a frozen SAE, measured on a held-out test split", "",
        f"Rerun: `python bench/train_gap.py` ({res['wall_minutes']} min here). SAE `{sae['folder']}` at "
        f"`{sae['hook']}`: d_sae {sae['d_sae']}, k {sae['k']}, held-out FVU {fvu}, dead latents "
        f"{sae['dead_latents']}; spliced positions: every position except those its policy keeps "
        f"({sae['saelora_policy']}).", "",
        f"Test split: {st['eval_tokens']} tokens ({st['test_rows']} rows of {st['seq_len']}), documents never seen "
        f"by the SAE or any run. Budget per run: {st['run_steps']} steps of batch {st['batch_size']} x {st['seq_len']} "
        f"tokens ({st['run_steps'] * st['batch_size'] * st['seq_len']} training tokens), {st['warmup_steps']} warm-up "
        f"steps then {st['schedule']} decay; LoRA rank {st['rank']}. Validation: {st['val_rows']} rows of the "
        f"validation split, seeds shuffle which rows.", "",
        f"CE base {res['ce_base']:.4f}, SAE spliced {res['ce_spliced']:.4f}: gap {res['gap']:.4f} nats.", "",
        *_arm_rows(res), "", "Every run (learning-rate choice on the validation split):", "", *_sweep_rows(res), "",
        "## The paper's comparison: from scratch, total wall time", "", *_scratch_rows(res["from_scratch"]), "",
        DIFFERENCES, "![validation CE vs training time](" + path.with_suffix(".png").name + ")"]
    path.write_text("\n".join(lines) + "\n")


def plot(res: dict[str, Any], png: Path) -> None:
    """Left: validation gap closed of every chosen run against training time. Right: the from-scratch comparison,
    validation CE against total wall time (SAE training included)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 5))
    for arm, a in res["arms"].items():
        for r in a["runs"]:
            if r.get("chosen"):
                ax.plot([t / 60 for t, _ in r["val_gap_curve"]], [100 * g for _, g in r["val_gap_curve"]], "o-",
                        ms=3, label=f"{arm} lr {r['lr']:g} seed {r['seed']}")
    ax.axhline(30, color="k", ls=":", label="target 30%")
    ax.set(xlabel="training wall time (min, 2 CPU cores)", ylabel="gap closed on validation (%)",
           title="CE gap closed (validation rows)")
    ax.legend(fontsize=7)
    s = res.get("from_scratch")
    if s:
        bx.plot([t / 60 for t, _ in s["topk_lora_val_curve"]], [c for _, c in s["topk_lora_val_curve"]], "s--",
                ms=3, label="TopK from scratch + LoRA (incl. SAE time)")
        bx.plot([t / 60 for t, _ in s["e2e"]["val_curve"]], [c for _, c in s["e2e"]["val_curve"]], "^--", ms=3,
                label="e2e SAE from scratch (KL)")
        bx.set(xlabel="total wall time (min, 2 CPU cores)", ylabel="validation CE (nats/token)",
               title="the paper's comparison, from scratch")
        bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
