// The page's only way to the server: saelora's public HTTP API (the same routes any client uses).
// The server is this page's origin, or ?server=URL when the page is opened as a static file.
"use strict";

const Api = (() => {
  const params = new URLSearchParams(location.search);
  const given = params.get("server");
  if (given) sessionStorage.setItem("saelora.server", given);
  const base = (sessionStorage.getItem("saelora.server") || (location.protocol.startsWith("http") ? location.origin : "http://127.0.0.1:8000")).replace(/\/$/, "");

  function key() { return sessionStorage.getItem("saelora.key") || ""; }

  // Ask for a key (kept in this tab's session only); resolves when one is given.
  function askKey() {
    const dialog = document.getElementById("key-dialog");
    const input = document.getElementById("key-input");
    input.value = "";
    return new Promise((resolve) => {
      dialog.addEventListener("close", () => {
        if (input.value.trim()) sessionStorage.setItem("saelora.key", input.value.trim());
        resolve();
      }, { once: true });
      if (!dialog.open) dialog.showModal();
    });
  }

  class ApiError extends Error {
    constructor(status, body) {
      const err = (body && body.error) || {};
      super(err.message || `HTTP ${status}`);
      this.status = status; this.param = err.param; this.code = err.code;
    }
  }

  async function call(method, path, body, retried = false) {
    const headers = { "Content-Type": "application/json" };
    if (key()) headers["Authorization"] = "Bearer " + key();
    const r = await fetch(base + path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    if (r.status === 401 && !retried) { await askKey(); return call(method, path, body, true); }
    const data = r.headers.get("content-type")?.includes("json") ? await r.json() : null;
    if (!r.ok) throw new ApiError(r.status, data);
    return data;
  }

  // POST with `stream: true`; calls onChunk(chunk) for every server-sent event, resolves at [DONE].
  async function stream(path, body, onChunk, retried = false) {
    const headers = { "Content-Type": "application/json" };
    if (key()) headers["Authorization"] = "Bearer " + key();
    const r = await fetch(base + path, { method: "POST", headers, body: JSON.stringify({ ...body, stream: true }) });
    if (r.status === 401 && !retried) { await askKey(); return stream(path, body, onChunk, true); }
    if (!r.ok) throw new ApiError(r.status, await r.json().catch(() => null));
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).trim();
        buf = buf.slice(cut + 2);
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk);
        onChunk(chunk);
      }
    }
  }

  return { base, call, stream, ApiError, get: (p) => call("GET", p), post: (p, b) => call("POST", p, b),
           put: (p, b) => call("PUT", p, b), del: (p) => call("DELETE", p) };
})();

// Small DOM helpers shared by the views.
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c instanceof Node ? c : String(c));
  return el;
}

function toast(text, isError = false) {
  const t = document.getElementById("toast");
  t.textContent = text;
  t.className = "show" + (isError ? " error" : "");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.className = ""; }, 4000);
}

function field(label, input) { return h("label", {}, label, input); }

function fmt(v, digits = 3) { return v === null || v === undefined ? "–" : Number(v).toPrecision(digits); }
