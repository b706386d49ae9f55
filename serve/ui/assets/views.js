// Views: Generate, Features (search and a feature's page), Adapters & presets. Steer is in steer.js.
"use strict";

const Views = {};

async function saeList() { return (await Api.get("/v1/saes")).data; }
async function modelList() { return (await Api.get("/v1/models")).data.map((m) => m.id); }
function options(values, selected) { return values.map((v) => h("option", { value: v, selected: v === selected }, v)); }
function featureLink(sae, index) { return h("a", { href: "#", "data-go": `features/${sae}/${index}` }, `#${index}`); }

// ---- Generate ------------------------------------------------------------------------------------------------
Views.generate = async (root) => {
  const [models, saes] = await Promise.all([modelList(), saeList()]);
  const model = h("select", { id: "gen-model" }, options(models));
  const mode = h("select", { id: "gen-mode" }, h("option", { value: "" }, "(the model's)"),
                 options(["error_term", "replace", "off"]));
  const sae = h("select", { id: "gen-sae" }, options(saes.map((s) => s.id)));
  const latent = h("input", { id: "gen-latent", type: "number", min: 0, placeholder: "latent to colour" });
  const topK = h("input", { id: "gen-topk", type: "number", min: 1, max: 64, value: 8 });
  const maxTokens = h("input", { id: "gen-max", type: "number", min: 1, max: 512, value: 24 });
  const temp = h("input", { id: "gen-temp", type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  const prompt = h("textarea", { id: "gen-prompt" }, "The history of the Roman Empire");
  const out = h("div", { id: "gen-out", class: "panel text" });
  const side = h("div", { id: "gen-side", class: "panel" }, h("span", { class: "muted" }, "click a token to see its latents"));
  const tokens = [];  // {span, feats}

  function colour() {
    const want = latent.value === "" ? null : Number(latent.value);
    const valueOf = (t) => {
      const f = t.feats.find((x) => x.sae === sae.value);
      const i = f ? f.indices.indexOf(want) : -1;
      return i >= 0 ? f.values[i] : 0;
    };
    const top = Math.max(1e-9, ...tokens.map(valueOf));
    for (const t of tokens) {
      const v = want === null ? 0 : valueOf(t);
      t.span.style.background = v > 0 ? `rgba(var(--hl), ${Math.min(1, 0.15 + 0.85 * v / top)})` : "";
      t.span.title = want === null ? "" : `#${want}: ${fmt(v)}`;
    }
  }

  function showToken(t) {
    for (const x of tokens) x.span.classList.toggle("sel", x === t);
    side.replaceChildren(h("p", {}, h("b", {}, JSON.stringify(t.token)), h("span", { class: "muted" }, ` position ${t.position}`)));
    for (const f of t.feats) {
      side.append(h("table", { class: "latents" }, h("tr", {}, h("th", {}, f.sae), h("th", {}, "value")),
        f.indices.map((i, k) => h("tr", {}, h("td", {}, featureLink(f.sae, i)), h("td", {}, fmt(f.values[k]))))));
    }
  }

  function add(list, kind) {
    for (const t of list || []) {
      const span = h("span", { class: `tok ${kind}` }, t.token);
      const entry = { span, feats: t.features, token: t.token, position: t.position };
      span.addEventListener("click", () => showToken(entry));
      tokens.push(entry);
      out.append(span);
    }
    colour();
  }

  async function run() {
    out.replaceChildren();
    tokens.length = 0;
    const ext = { features: { top_k: Number(topK.value), include_prompt: true } };
    if (mode.value) ext.mode = mode.value;
    const body = { model: model.value, prompt: prompt.value, max_tokens: Number(maxTokens.value),
                   temperature: Number(temp.value), sae: ext };
    try {
      await Api.stream("/v1/completions", body, (chunk) => {
        for (const ch of chunk.choices) {
          if (ch.features) { add(ch.features.prompt, "prompt"); add(ch.features.generated, "gen"); }
          if (ch.finish_reason) out.dataset.finished = ch.finish_reason;
        }
      });
    } catch (e) { toast(e.message, true); }
  }

  latent.addEventListener("input", colour);
  sae.addEventListener("change", colour);
  root.append(h("h2", {}, "Generate"),
    h("div", { class: "row" }, field("model / adapter / preset", model), field("SAE mode", mode),
      field("latents per token", topK), field("max tokens", maxTokens), field("temperature", temp)),
    prompt,
    h("div", { class: "row" }, h("button", { id: "gen-run", onclick: run }, "Generate"),
      field("SAE", sae), field("colour by latent", latent)),
    h("div", { class: "split" }, out, side));
};

// ---- Features -------------------------------------------------------------------------------------------------
Views.features = async (root, args) => {
  if (args.length >= 2) return featurePage(root, args[0], Number(args[1]));
  const saes = await saeList();
  const sae = h("select", { id: "feat-sae" }, options(saes.map((s) => s.id)));
  const q = h("input", { id: "feat-q", placeholder: "words, e.g. music" });
  const idx = h("input", { id: "feat-index", type: "number", min: 0, placeholder: "latent index" });
  const hits = h("div", { id: "feat-hits" });
  async function search() {
    try {
      const r = await Api.get(`/v1/saes/${encodeURIComponent(sae.value)}/search?q=${encodeURIComponent(q.value)}&n=20`);
      hits.replaceChildren(h("table", {}, h("tr", {}, h("th", {}, "latent"), h("th", {}, "score"), h("th", {}, "top tokens"), h("th", {}, "promotes")),
        r.data.map((x) => h("tr", {}, h("td", {}, featureLink(r.sae, x.index)), h("td", {}, x.score),
          h("td", {}, x.tokens.slice(0, 8).join(" · ")), h("td", {}, x.promoted.slice(0, 6).join(" · "))))));
    } catch (e) { hits.replaceChildren(h("p", { class: "error" }, e.message)); }
  }
  root.append(h("h2", {}, "Features"),
    h("div", { class: "row" }, field("SAE", sae), field("search the descriptions", q),
      h("button", { id: "feat-search", onclick: search }, "Search"), field("or open", idx),
      h("button", { class: "plain", onclick: () => go(`features/${sae.value}/${idx.value || 0}`) }, "Open")),
    hits);
};

// Bars of `counts`, labelled with the range [lo, hi].
function bars(counts, lo, hi) {
  const W = 320, H = 90, bins = counts.length;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H + 14}`);
  svg.setAttribute("class", "hist");
  if (!bins) return svg;
  const top = Math.max(...counts);
  counts.forEach((c, i) => {
    const r = document.createElementNS(svg.namespaceURI, "rect");
    const bh = (c / top) * H;
    r.setAttribute("x", (i * W) / bins + 1); r.setAttribute("width", W / bins - 2);
    r.setAttribute("y", H - bh); r.setAttribute("height", bh);
    svg.append(r);
  });
  for (const [x, v, anchor] of [[0, lo, "start"], [W, hi, "end"]]) {
    const t = document.createElementNS(svg.namespaceURI, "text");
    t.setAttribute("x", x); t.setAttribute("y", H + 12); t.setAttribute("font-size", 10);
    t.setAttribute("text-anchor", anchor); t.textContent = fmt(v);
    svg.append(t);
  }
  return svg;
}

// The latent's activation histogram over the described corpus (log-spaced bins), else one of its top contexts'
// activations (descriptions written before histograms were kept), each titled for what it is.
function histogram(f) {
  if (f.histogram) {
    const e = f.histogram.edges, n = f.histogram.counts.reduce((a, b) => a + b, 0);
    return [h("h3", {}, "Activation histogram"), bars(f.histogram.counts, e[0], e[e.length - 1]),
            h("p", { class: "muted" }, `${n} active tokens; bins double every two, ${fmt(e[0])} to ${fmt(e[e.length - 1])}`)];
  }
  const values = f.top.map((c) => c.value), bins = 12;
  const lo = Math.min(...values), hi = Math.max(...values), width = (hi - lo) / bins || 1;
  const counts = Array(bins).fill(0);
  for (const v of values) counts[Math.min(bins - 1, Math.floor((v - lo) / width))]++;
  return [h("h3", {}, "Activations of its top contexts"), bars(values.length ? counts : [], lo, hi)];
}

async function featurePage(root, sae, index) {
  const t0 = performance.now();
  const f = await Api.get(`/v1/saes/${encodeURIComponent(sae)}/features/${index}`);
  const similar = h("div", { id: "feat-similar" });
  async function findSimilar() {
    const r = await Api.get(`/v1/saes/${encodeURIComponent(sae)}/features/${index}/similar?n=10`);
    similar.replaceChildren(h("p", { class: "muted" }, "closest by decoder direction (cosine)"),
      h("table", {}, r.data.map((x) => h("tr", {}, h("td", {}, featureLink(sae, x.index)), h("td", {}, fmt(x.cosine))))));
  }
  const contexts = f.top.map((c) => h("tr", { class: "ctx" }, h("td", {}, fmt(c.value)),
    h("td", { class: "text" }, c.left, h("b", {}, c.token), c.right)));
  const logits = (side) => (f.logits ? f.logits[side] : []).map((t) => h("span", { class: "logit" }, `${JSON.stringify(t.token)} ${fmt(t.value)}  `));
  root.append(h("h2", {}, `${sae} · latent ${index}`),
    h("p", { id: "feat-stats" }, f.described ? `density ${fmt(f.density)} · max ${fmt(f.max)} · ${f.top.length} top contexts`
      : "no feature descriptions for this SAE (run `saelora features`): logits only"),
    h("div", { class: "row" },
      h("button", { id: "feat-steer", onclick: () => go(`steer?sae=${encodeURIComponent(sae)}&feature=${index}`) }, "Steer with this"),
      h("button", { id: "feat-find-similar", class: "plain", onclick: findSimilar }, "Find similar"),
      h("a", { href: "#", "data-go": "features" }, "search")),
    h("div", { class: "split" },
      h("div", {}, h("h3", {}, "Top contexts"), h("table", { id: "feat-contexts" }, contexts)),
      h("div", {}, histogram(f),
        h("h3", {}, "Promotes"), h("p", { id: "feat-promoted" }, logits("promoted")),
        h("h3", {}, "Suppresses"), h("p", {}, logits("suppressed")), similar)));
  root.dataset.loadMs = Math.round(performance.now() - t0);
}

// ---- Adapters & presets ----------------------------------------------------------------------------------------
Views.adapters = async (root) => {
  const [adapters, presets] = await Promise.all([Api.get("/v1/adapters"), Api.get("/v1/steering/presets")]);
  const reload = () => render();
  const act = (fn) => async () => { try { await fn(); reload(); } catch (e) { toast(e.message, true); } };
  const name = h("input", { id: "ad-name", placeholder: "name" }), path = h("input", { id: "ad-path", placeholder: "folder under --adapter-root" });
  root.append(h("h2", {}, "Adapters"),
    h("table", { id: "ad-list" }, h("tr", {}, ["name", "folder", "rank", "SAEs", "in flight", "eval", ""].map((x) => h("th", {}, x))),
      adapters.data.map((a) => h("tr", {}, h("td", {}, a.name), h("td", {}, a.path), h("td", {}, a.rank),
        h("td", {}, a.saes.join(", ")), h("td", {}, a.in_flight),
        h("td", {}, Object.entries(a.metrics).map(([k, v]) => `${k} ${fmt(v)}`).join(" · ")),
        h("td", {}, h("button", { class: "plain", onclick: act(() => Api.post("/v1/unload_lora_adapter", { lora_name: a.name })) }, "Unload"))))),
    h("div", { class: "row" }, field("load as", name), field("from", path),
      h("button", { id: "ad-load", onclick: act(() => Api.post("/v1/load_lora_adapter", { lora_name: name.value, lora_path: path.value })) }, "Load")),
    h("p", { class: "muted" }, "Loading and unloading need the admin key when the server has one."),
    h("h2", {}, "Steering presets"),
    h("table", { id: "preset-list" }, h("tr", {}, ["name", "mode", "edits", ""].map((x) => h("th", {}, x))),
      presets.data.map((p) => h("tr", {}, h("td", {}, p.name), h("td", {}, p.mode),
        h("td", {}, p.edits.map((e) => `${e.op} #${e.feature} ${e.value}`).join(", ")),
        h("td", {}, h("a", { href: "#", "data-go": `steer?preset=${encodeURIComponent(p.name)}` }, "steer"), " ",
          h("button", { class: "plain", onclick: act(() => Api.del(`/v1/steering/presets/${encodeURIComponent(p.name)}`)) }, "Delete"))))));
};
