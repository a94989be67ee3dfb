"""API keys, from anywhere but the command line's history.

In order: a key given in code (``open_box(..., key=...)``); ``--key-file PATH`` (the file's
first line); the transport's environment variable (``BBPT_API_KEY``, ``HF_TOKEN``,
``OPENAI_API_KEY``); the keys file, ``$BBPT_KEYS_FILE`` or ``~/.config/bbpt/keys.toml``:

    [keys]
    "http://127.0.0.1:8000" = "bbpt-..."        # a URL prefix (the longest match wins)
    "hf:https://my-endpoint.example" = "hf_..."  # or KIND:URL prefix

No CLI option takes the key itself, so it never lands in a shell's history or ``ps``.
"""
from __future__ import annotations

import os
from pathlib import Path

from .._compat import tomllib
from ..errors import BadInput


def keys_file() -> Path:
    return Path(os.environ.get("BBPT_KEYS_FILE") or Path.home() / ".config" / "bbpt" / "keys.toml")


def _from_file(path: str | Path) -> str:
    p = Path(path).expanduser()
    try:
        lines = p.read_text().splitlines()
    except OSError as e:
        raise BadInput(f"--key-file {p}: cannot read it ({e.strerror or e}); give a file whose first line is the key") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise BadInput(f"--key-file {p} is empty; its first line must be the API key")
    return key


def _from_keys_file(spec) -> str | None:
    path = keys_file()
    if not path.is_file():
        return None
    try:
        table = tomllib.loads(path.read_text()).get("keys", {})
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise BadInput(f"keys file {path} cannot be read ({e}); fix it or set BBPT_KEYS_FILE to another") from None
    if not isinstance(table, dict):
        raise BadInput(f"keys file {path}: [keys] must be a table of \"URL\" = \"KEY\" lines")
    url, full = spec.url or "", str(spec)
    best = None
    for prefix, key in table.items():
        if isinstance(key, str) and (full.startswith(prefix) or url.startswith(prefix)):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, key)
    return best[1] if best else None


def resolve_key(spec, env: str | None, key: str | None = None, key_file: str | None = None) -> str | None:
    """The key for the box ``spec`` (see the module doc), or None if none is set anywhere."""
    if key:
        return key
    if key_file:
        return _from_file(key_file)
    if env and os.environ.get(env):
        return os.environ[env]
    return _from_keys_file(spec)
