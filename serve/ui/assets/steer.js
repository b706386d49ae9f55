// Steer: edits as rows, a strength slider, steered and unsteered side by side from one `compare` call,
// presets saved and loaded, and auto-steer where the server offers it.
"use strict";

const OPS = ["add", "set", "scale", "clamp_max", "clamp_min", "ablate"];
const UNITS = ["raw", "max", "norm"];
const POSITIONS = ["all", "generated", "prompt"];

function editRow(e = {}) {
  const row = h("div", { class: "edit-row" },
    field("latent", h("input", { class: "e-feature", type: "number", min: 0, value: e.feature ?? "" })),
    field("op", h("select", { class: "e-op" }, options(OPS, e.op || "add"))),
    field("value", h("input", { class: "e-value", type: "number", step: "any", value: e.value ?? 4 })),
    field("unit", h("select", { class: "e-unit" }, options(UNITS, e.unit || "raw"))),
    field("positions", h("select", { class: "e-pos" }, options(POSITIONS, typeof e.positions === "string" ? e.positions : "all"))),
    field("only where latent", h("input", { class: "e-when", type: "number", min: 0, value: e.when?.feature ?? "" })),
    field("is above", h("input", { class: "e-above", type: "number", step: "any", value: e.when?.above ?? "" })),
    h("button", { class: "plain", onclick: () => row.remove() }, "✕"));
  return row;
}

function readEdits(rows, sae, strength) {
  return [...rows.querySelectorAll(".edit-row")].filter((r) => r.querySelector(".e-feature").value !== "").map((r) => {
    const q = (c) => r.querySelector(c).value;
    const e = { sae, feature: Number(q(".e-feature")), op: q(".e-op"), value: Number(q(".e-value")) * strength,
                unit: q(".e-unit"), positions: q(".e-pos") };
    if (q(".e-when") !== "") e.when = { sae, feature: Number(q(".e-when")), above: Number(q(".e-above") || 0) };
    return e;
  });
}

Views.steer = async (root, args, params) => {
  const [models, saes, presets] = await Promise.all([modelList(), saeList(), Api.get("/v1/steering/presets")]);
  const model = h("select", { id: "st-model" }, options(models.filter((m) => !m.includes("+"))));
  const sae = h("select", { id: "st-sae" }, options(saes.map((s) => s.id), params.get("sae")));
  const mode = h("select", { id: "st-mode" }, options(["error_term", "replace"]));
  const prompt = h("textarea", { id: "st-prompt" }, "My favourite thing to do on a weekend is");
  const maxTokens = h("input", { id: "st-max", type: "number", min: 1, max: 256, value: 24 });
  const strength = h("input", { id: "st-strength", type: "range", min: 0, max: 3, step: 0.1, value: 1 });
  const strengthLabel = h("span", { class: "muted" }, "× 1");
  strength.addEventListener("input", () => { strengthLabel.textContent = `× ${strength.value}`; });
  const rows = h("div", { id: "st-edits" });
  const steered = h("div", { id: "st-steered", class: "panel text" }), plain = h("div", { id: "st-unsteered", class: "panel text" });
  const presetName = h("input", { id: "st-preset-name", placeholder: "preset name" });
  const presetPick = h("select", { id: "st-preset-pick" }, h("option", { value: "" }, "(load a preset)"), options(presets.data.map((p) => p.name)));

  function fill(preset) {
    rows.replaceChildren(...(preset.edits.length ? preset.edits : [{}]).map(editRow));
    mode.value = preset.mode || "error_term";
  }
  if (params.get("feature") !== null) rows.append(editRow({ feature: Number(params.get("feature")), op: "add", value: 4 }));
  else rows.append(editRow());
  if (params.get("preset")) {
    presetPick.value = params.get("preset");
    fill(await Api.get(`/v1/steering/presets/${encodeURIComponent(params.get("preset"))}`));
  }

  async function compare() {
    const body = { model: model.value, prompt: prompt.value, max_tokens: Number(maxTokens.value), temperature: 0,
                   sae: { mode: mode.value, edits: readEdits(rows, sae.value, Number(strength.value)), compare: true } };
    steered.textContent = plain.textContent = "…";
    try {
      const ch = (await Api.post("/v1/completions", body)).choices[0];
      steered.textContent = ch.text;
      plain.textContent = ch.unsteered ? ch.unsteered.text : "";
    } catch (e) { steered.textContent = plain.textContent = ""; toast(e.message, true); }
  }
  async function save() {
    try {
      await Api.put(`/v1/steering/presets/${encodeURIComponent(presetName.value)}`,
                    { mode: mode.value, edits: readEdits(rows, sae.value, Number(strength.value)) });
      toast(`saved preset ${presetName.value}`);
      if (![...presetPick.options].some((o) => o.value === presetName.value)) presetPick.append(h("option", { value: presetName.value }, presetName.value));
    } catch (e) { toast(e.message, true); }
  }
  presetPick.addEventListener("change", async () => {
    if (presetPick.value) fill(await Api.get(`/v1/steering/presets/${encodeURIComponent(presetPick.value)}`));
  });

  root.append(h("h2", {}, "Steer"),
    h("div", { class: "row" }, field("model / adapter", model), field("SAE", sae), field("mode", mode), field("max tokens", maxTokens)),
    prompt, rows,
    h("div", { class: "row" }, h("button", { class: "plain", onclick: () => rows.append(editRow()) }, "+ edit"),
      field("strength", strength), strengthLabel,
      h("button", { id: "st-run", onclick: compare }, "Steer & compare")),
    h("div", { class: "pair" }, h("div", {}, h("h3", {}, "Steered"), steered), h("div", {}, h("h3", {}, "Unsteered"), plain)),
    h("div", { class: "row" }, presetName, h("button", { id: "st-save", class: "plain", onclick: save }, "Save as preset"), presetPick),
    autoSteer(sae, fill));
};

// Auto-steer (POST /v1/steering/auto) on servers that run the model in process; others answer 404 and the
// section says so.
function autoSteer(sae, fill) {
  const name = h("input", { id: "as-name", placeholder: "preset name" });
  const texts = h("textarea", { id: "as-texts", placeholder: "at least four example texts of the concept, one per line" });
  const status = h("span", { class: "muted" });
  async function run() {
    status.textContent = "searching, sweeping and judging (a minute or more)…";
    try {
      const r = await Api.post("/v1/steering/auto", { name: name.value, sae: sae.value,
        positive: texts.value.split("\n").map((t) => t.trim()).filter(Boolean) });
      fill(r.preset);
      status.textContent = `stored preset ${r.preset.name}: concept ${fmt(r.measured.concept)}, fluency gap ${fmt(r.measured.fluency_gap)}`;
    } catch (e) { status.textContent = e.status === 404 || e.status === 405 ? "this server's engine has no auto-steer" : e.message; }
  }
  return h("details", {}, h("summary", {}, "Auto-steer from example texts"), name, texts,
    h("div", { class: "row" }, h("button", { class: "plain", onclick: run }, "Run auto-steer"), status));
}
