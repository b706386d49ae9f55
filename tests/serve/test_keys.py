"""Where the server's keys come from, and the exposure rule (serve/keys.py): a key from its flag, its file or
the environment, in that order; an empty key is an error; a non-loopback bind without a key is refused unless
--allow-unauthenticated, before anything is loaded."""

import subprocess
import sys

import pytest

from saelora.adapters.errors import ConfigError
from saelora.serve.keys import is_loopback, resolve


def test_a_key_comes_from_flag_then_file_then_environment(tmp_path, monkeypatch):
    f = tmp_path / "key"
    f.write_text("from-file\nignored second line\n")
    monkeypatch.setenv("SAELORA_API_KEY", "from-env")
    monkeypatch.setenv("SAELORA_ADMIN_API_KEY", " admin-env ")
    assert resolve("127.0.0.1", "from-flag", str(f), None, None, False).api_key == "from-flag"
    assert resolve("127.0.0.1", None, str(f), None, None, False).api_key == "from-file"
    keys = resolve("127.0.0.1", None, None, None, None, False)
    assert (keys.api_key, keys.admin_api_key) == ("from-env", "admin-env")
    monkeypatch.delenv("SAELORA_API_KEY")
    assert resolve("127.0.0.1", None, None, None, None, False).api_key is None


@pytest.mark.parametrize("bad", ["empty-file", "missing-file", "empty-flag"])
def test_an_empty_or_unreadable_key_is_a_clear_error(tmp_path, monkeypatch, bad):
    f = tmp_path / "key"
    if bad == "empty-file":
        f.write_text("  \n")
    with pytest.raises(ConfigError, match="empty|cannot be read"):
        resolve("127.0.0.1", " " if bad == "empty-flag" else None, str(f), None, None, False)


def test_an_empty_environment_variable_counts_as_unset(monkeypatch):
    """compose.yaml passes the optional admin key as an empty variable when it is not set."""
    monkeypatch.setenv("SAELORA_ADMIN_API_KEY", "")
    assert resolve("127.0.0.1", None, None, None, None, False).admin_api_key is None


def test_a_non_loopback_bind_needs_a_key_or_an_explicit_opt_out(monkeypatch):
    monkeypatch.delenv("SAELORA_API_KEY", raising=False)
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.5", "example.org"]))
    with pytest.raises(ConfigError, match="SAELORA_API_KEY.*--allow-unauthenticated"):
        resolve("0.0.0.0", None, None, None, None, False)
    assert resolve("0.0.0.0", None, None, None, None, True).api_key is None
    assert resolve("0.0.0.0", "k", None, None, None, False).api_key == "k"


def test_the_cli_refuses_an_open_public_bind_before_loading_anything(monkeypatch):
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("SAELORA_API")}
    r = subprocess.run([sys.executable, "-m", "saelora", "serve", "--host", "0.0.0.0", "--port", "1"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode != 0 and "--allow-unauthenticated" in r.stderr and "Traceback" not in r.stderr
