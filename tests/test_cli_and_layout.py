"""The `saelora` command and the package dependency rule."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import saelora

ROOT = Path(__file__).resolve().parents[1]


def _run(*args):
    return subprocess.run([sys.executable, "-m", "saelora", *args], capture_output=True, text=True, timeout=120)


def test_version():
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"saelora {saelora.__version__}"


def test_info_json():
    r = _run("info", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["model"] == "smollm2-135m" and data["device"] in ("cpu", "cuda")
    assert data["versions"]["torch"].startswith("2.13.0")
    for lib in ("transformers", "peft", "sae-lens"):
        assert data["versions"][lib]
    assert data["embedded_model_gguf"].endswith(".gguf") and "problem" not in data


def test_no_command_prints_help():
    r = _run()
    assert r.returncode == 2 and "usage: saelora" in r.stdout


def _imports(folder: str) -> set[str]:
    found = set()
    for path in (ROOT / folder).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module if node.level == 0 else f"<relative>.{node.module}")
    return found


@pytest.mark.parametrize("folder,forbidden", [
    ("trainer", ("saelora.serve",)),
    ("serve", ("saelora.trainer",)),
    ("adapters", ("saelora.trainer", "saelora.serve", "saelora.clients")),
])
def test_dependency_rule(folder, forbidden):
    bad = {m for m in _imports(folder) if m.startswith(forbidden)}
    assert not bad, f"{folder}/ must not import {bad}"


def test_namespace_maps_onto_top_level_folders():
    import saelora.adapters
    import saelora.clients
    import saelora.serve
    import saelora.trainer

    for mod, folder in [(saelora.adapters, "adapters"), (saelora.trainer, "trainer"), (saelora.serve, "serve"),
                        (saelora.clients, "clients")]:
        assert Path(mod.__file__).parent == ROOT / folder


@pytest.mark.parametrize("command", ["train", "train-e2e", "train-sae", "eval", "features", "serve"])
def test_every_option_is_documented(command):
    from saelora.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    parser = sub.choices[command]
    for action in parser._actions:
        if action.dest == "help":
            continue
        text = (action.help or "").split("(default")[0].strip()
        assert text, f"saelora {command} {action.option_strings[0]} has no help text"


def test_no_top_level_folder_shadows_the_package():
    """Invariant: after a plain (non-editable) install, `import saelora.clients` works from the repository root.
    The install goes to a temporary target; site-packages is put on the path without its .pth files, so the
    dev venv's editable finder cannot paper over a shadowing folder."""
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert "saelora" not in folders


@pytest.mark.slow
def test_plain_install_imports_from_repository_root(tmp_path):
    import shutil
    import site
    src, target = tmp_path / "src", tmp_path / "site"  # built from a copy: the build leaves no build/ behind
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "runs", "build", "__pycache__",
                                                              "*.egg-info", "bench", "tests", "docs"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    path = ":".join([str(target), *site.getsitepackages()])
    code = "import saelora, saelora.clients; print(saelora.clients.__file__)"
    r = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                       env={"PYTHONPATH": path, "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(target))


def test_every_embedded_model_has_a_demo_adapter_recipe():
    from saelora.adapters.models import EMBEDDED_MODELS
    from saelora.demo import ADAPTER_RECIPES

    assert set(ADAPTER_RECIPES) == set(EMBEDDED_MODELS)
    assert all({"layers", "lr", "steps"} <= set(r) for r in ADAPTER_RECIPES.values())


def test_demo_rebuilds_a_cache_built_from_another_recipe(tmp_path):
    """Invariant: a cached demo SAE and adapter are reused only under the recipe they were built from (a newly
    shipped SAE, another default corpus or another --lora-steps builds them again); a cache without a recipe stamp
    is rebuilt."""
    import argparse

    from saelora.demo import _drop_stale, _recipe

    def build():
        for part in ("sae", "adapter"):
            (tmp_path / part).mkdir(exist_ok=True)
            (tmp_path / part / "x").write_text("built")

    recipe = _recipe(argparse.Namespace(model="smollm2-135m", rank=64, feature_rows=128))
    assert recipe["corpus"] == "mix" and len(recipe["sae"]) == 64  # the shipped SAE's weights, hashed
    build()
    _drop_stale(tmp_path, recipe)  # no stamp: an older demo
    assert not (tmp_path / "sae").exists() and json.loads((tmp_path / "recipe.json").read_text()) == recipe
    build()
    _drop_stale(tmp_path, recipe)
    assert (tmp_path / "sae" / "x").read_text() == "built"
    _drop_stale(tmp_path, {**recipe, "corpus": "wiki"})
    assert not (tmp_path / "sae").exists() and not (tmp_path / "adapter").exists()
    build()  # --lora-steps other than the recipe's: the cached 200-step adapter is not reused
    _drop_stale(tmp_path, recipe)
    longer = _recipe(argparse.Namespace(model="smollm2-135m", rank=64, feature_rows=128, lora_steps=800, lora_lr=None))
    assert longer["adapter"]["steps"] == 800 and longer["adapter"]["lr"] == recipe["adapter"]["lr"]
    _drop_stale(tmp_path, longer)
    assert not (tmp_path / "adapter").exists()


def test_free_port_never_hands_out_a_port_twice():
    """Invariant: ports picked before any server binds are distinct (a vLLM server and an in-process server picked
    one after the other once shared a port, and the second bind failed)."""
    from saelora.launch import free_port

    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
