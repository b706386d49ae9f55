"""The web interface: a single page at /ui (serve/ui/, plain HTML, CSS and JavaScript shipped in the package; no
build step, nothing fetched at run time). The page calls the public HTTP API only, with the key the user gives
it (kept in the tab's session), so it holds no data itself: its files are served without a key, under the same
Host rule as the API. Every /ui path answers the page (the page routes /ui/features/{sae}/{index} and the rest
itself); /ui/assets/* are its files. The same folder works as a static page pointed at any server
(`index.html?server=URL`, with that server started with `--allow-origin`)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

from ..core.engine import EngineError

UI = Path(__file__).resolve().parent.parent / "ui"
ASSETS = {p.name: p for p in (UI / "assets").iterdir() if p.suffix in (".js", ".css")}
MEDIA = {".js": "text/javascript", ".css": "text/css"}
PREFIX = "/ui"

router = APIRouter(include_in_schema=False)


def _page() -> str:
    # served under /ui/...: relative asset paths resolve against /ui/ (opened as a file, against its folder)
    return (UI / "index.html").read_text().replace("<head>", '<head>\n<base href="/ui/">', 1)


@router.get("/ui")
async def ui_root() -> RedirectResponse:
    return RedirectResponse("/ui/")


@router.get("/ui/assets/{name}")
async def ui_asset(name: str) -> FileResponse:
    path = ASSETS.get(name)  # only the shipped files, by name: no path from the request reaches the file system
    if path is None:
        raise EngineError("not_found", f"no UI asset {name!r}")
    return FileResponse(path, media_type=MEDIA[path.suffix], headers={"Cache-Control": "no-cache"})


@router.get("/ui/{rest:path}")
async def ui_page(rest: str) -> HTMLResponse:
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})
