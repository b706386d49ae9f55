"""Where `saelora serve` gets its keys, and when it refuses to start without one (docs/deployment.md).

A key comes from its flag, else its file flag, else its environment variable (`SAELORA_API_KEY`,
`SAELORA_ADMIN_API_KEY`): a flag is visible in `ps` and `docker inspect`, a file or the environment is not.
A server bound to a non-loopback address needs an API key unless `--allow-unauthenticated` says otherwise.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from saelora.adapters.errors import ConfigError

ENV = {"api_key": "SAELORA_API_KEY", "admin_api_key": "SAELORA_ADMIN_API_KEY"}


@dataclass(frozen=True)
class Keys:
    api_key: str | None
    admin_api_key: str | None


def read_key(flag: str | None, file: str | None, env: str, what: str) -> str | None:
    """The key from the flag, the file (its first line) or the environment, in that order; empty is an error."""
    if flag is not None:
        key, source = flag, f"--{what.replace('_', '-')}"
    elif file is not None:
        try:
            lines = Path(file).read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"--{what.replace('_', '-')}-file {file} cannot be read: {e.strerror}") from e
        key, source = (lines[0] if lines else ""), f"--{what.replace('_', '-')}-file {file}"
    elif os.environ.get(env):  # an empty variable counts as unset (compose passes optional ones so)
        key, source = os.environ[env], f"${env}"
    else:
        return None
    key = key.strip()
    if not key:
        raise ConfigError(f"{source} is empty: give a key, or leave it unset")
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def resolve(host: str, api_key: str | None, api_key_file: str | None, admin_api_key: str | None,
            admin_api_key_file: str | None, allow_unauthenticated: bool) -> Keys:
    keys = Keys(read_key(api_key, api_key_file, ENV["api_key"], "api_key"),
                read_key(admin_api_key, admin_api_key_file, ENV["admin_api_key"], "admin_api_key"))
    if not is_loopback(host) and keys.api_key is None and not allow_unauthenticated:
        raise ConfigError(f"--host {host} is reachable from other machines, and no API key is set: set "
                          f"${ENV['api_key']} (or --api-key-file), or pass --allow-unauthenticated to serve it open")
    return keys
