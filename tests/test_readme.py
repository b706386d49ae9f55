"""The README's Python examples run as written (`slow`: the embedded model, its shipped SAE, a real server on
127.0.0.1 with the torch engine). The only changes: the examples' `http://127.0.0.1:8000` becomes the test
server's address, and the names an example leaves to the reader (`law_texts`, `other_texts`) are given below.
An adapter bundle named `mine` sits under the server's adapter root, as the typed-client example assumes, and the
SAE has feature descriptions, as the demo's has."""

import contextlib
import io
import re
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
SERVED = [b for b in BLOCKS if "127.0.0.1:8000" in b]
GIVEN = {  # what the steering example leaves to the reader: texts of a concept (law) and of others
    "law_texts": ["The court ruled that the contract was void under the statute.",
                  "The judge sentenced the defendant after the jury returned its verdict.",
                  "Her lawyer filed an appeal against the ruling of the lower court.",
                  "The law requires a warrant before the police may search a home.",
                  "Parliament passed the act, and the supreme court upheld it.",
                  "The attorney argued that the evidence was inadmissible at trial."],
    "other_texts": ["The cat slept on the warm windowsill all afternoon.",
                    "We baked bread and ate it with butter and honey.",
                    "The river winds through green hills towards the sea.",
                    "She painted the fence blue before the summer rain.",
                    "The orchestra played a slow waltz in the park.",
                    "Bright stars filled the sky above the quiet village."],
}


def test_the_readme_has_the_examples_this_test_runs():
    assert len(BLOCKS) >= 4 and len(SERVED) == len(BLOCKS) - 1  # the core block, then the server examples


def test_the_core_example_runs_and_prints_the_policy_it_shows():
    code = BLOCKS[0]
    assert "127.0.0.1" not in code
    shown = re.search(r"print\(sae\.policy\.describe\(\)\)\s+# (.+)", code).group(1).strip()
    out = io.StringIO()
    ns: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md: the core in a few lines", "exec"), ns)  # noqa: S102 - the README's own code
    assert out.getvalue().strip() == shown
    assert ns["out"].shape[1] == ns["ids"]["input_ids"].shape[1] + 10
    assert len(ns["latents"]) > 0


@pytest.fixture(scope="module")
def server(embedded_server):
    return embedded_server


@pytest.mark.parametrize("i", range(len(SERVED)))
def test_each_server_example_runs_against_a_live_server(server, i):
    code = SERVED[i].replace("http://127.0.0.1:8000", server.url)
    exec(compile(code, f"README.md: server example {i + 1}", "exec"), dict(GIVEN))  # noqa: S102


DOCS = [Path(__file__).resolve().parents[1] / f for f in ("README.md", "docs/api.md")]


def curl_commands(text: str) -> list[str]:
    """Every `curl` command of a markdown text's bash blocks, in order: from `curl` to the first newline outside
    single quotes (a JSON body may span lines), comments outside quotes dropped."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for start in (m.start() for m in re.finditer(r"(?m)^curl ", block)):
            cmd, quoted, comment = [], False, False
            for ch in block[start:]:
                if ch == "\n" and not quoted:
                    break
                if ch == "'" and not comment:
                    quoted = not quoted
                elif ch == "#" and not quoted and (not cmd or cmd[-1].isspace()):
                    comment = True
                if not comment:
                    cmd.append(ch)
            out.append("".join(cmd).strip())
    return out


def test_the_docs_have_the_curl_examples_this_test_runs():
    found = {p.name: curl_commands(p.read_text()) for p in DOCS}
    assert len(found["README.md"]) >= 1 and len(found["api.md"]) >= 5
    assert all("localhost:8000" in c for cs in found.values() for c in cs)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_each_curl_example_answers_2xx_against_a_live_server(server, doc):
    """Run as written, in the document's order (the adapter is loaded before it is unloaded); only the
    address changes. `--fail-with-body`: an error answer fails the command."""
    import json
    import subprocess

    import httpx

    httpx.post(server.url + "/v1/unload_lora_adapter", json={"lora_name": "mine"})  # as a fresh server: the
    host = server.url.removeprefix("http://")  # README's client example leaves `mine` loaded, docs/api.md loads it
    for cmd in curl_commands(doc.read_text()):
        cmd = cmd.replace("localhost:8000", host).replace("curl -s ", "curl -s --fail-with-body ", 1)
        r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (cmd, r.stdout[-2000:], r.stderr[-2000:])
        assert "error" not in json.loads(r.stdout), (cmd, r.stdout[:500])
