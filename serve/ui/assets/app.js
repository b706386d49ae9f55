// Routing: /ui/<view>/<args...> when served by saelora (the server answers index.html for every /ui path),
// #/<view>/<args...> when the page is a static file.
"use strict";

const served = location.pathname.startsWith("/ui");

function route() {
  const raw = served && !location.hash ? location.pathname.replace(/^\/ui\/?/, "") : location.hash.replace(/^#\/?/, "");
  const [path, query] = raw.split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const params = new URLSearchParams(query || (served ? location.search : ""));
  return { view: parts[0] || "generate", args: parts.slice(1), params };
}

function go(path) {
  if (served) history.pushState(null, "", "/ui/" + path);
  else location.hash = "#/" + path;
  render();
}

async function render() {
  const { view, args, params } = route();
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === view);
  const root = document.getElementById("view");
  root.replaceChildren();
  const show = Views[view] || Views.generate;
  try {
    await show(root, args, params);
  } catch (e) {
    root.append(h("p", { class: "error" }, e.message));
  }
}

document.addEventListener("click", (e) => {
  const a = e.target.closest("a[data-view], a[data-go]");
  if (!a) return;
  e.preventDefault();
  go(a.dataset.go || a.dataset.view);
});
window.addEventListener("popstate", render);
window.addEventListener("hashchange", render);
document.getElementById("server").textContent = Api.base;
render();
