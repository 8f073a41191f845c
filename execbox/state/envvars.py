"""Seed "Option 1": state in through env vars, out through ``OUTPUT_STATE:`` lines."""

from __future__ import annotations

import json
from typing import Any

from ..exceptions import InvalidRequestError
from ..models import ENV_NAME_RE

__all__ = ["MARKER", "extract_state", "state_env"]

MARKER = "OUTPUT_STATE:"
STATE_VAR = "EXECBOX_STATE"


def state_env(state: Any, max_bytes: int) -> dict[str, str]:
    """Env vars that give ``state`` to a program: EXECBOX_STATE (JSON) and STATE_<KEY> for scalars."""
    try:
        encoded = json.dumps(state, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError("state", f"not JSON-serializable: {exc}") from None
    if len(encoded.encode()) > max_bytes:
        raise InvalidRequestError("state", f"larger than {max_bytes} bytes")
    env = {STATE_VAR: encoded}
    if isinstance(state, dict):
        for key, value in state.items():
            name = f"STATE_{key.upper()}" if isinstance(key, str) else ""
            if ENV_NAME_RE.match(name) and isinstance(value, str | int | float | bool) and value is not None:
                env[name] = json.dumps(value) if isinstance(value, bool) else str(value)
    return env


def extract_state(stdout: str) -> tuple[str, Any, str | None, bool]:
    """Split ``OUTPUT_STATE:`` lines off stdout: (clean stdout, state, error, found).

    The last such line wins. If it is not valid JSON the error says why and the
    output is returned untouched.
    """
    if MARKER not in stdout:
        return stdout, None, None, False
    lines = stdout.splitlines(keepends=True)
    kept: list[str] = []
    last: str | None = None
    for line in lines:
        if line.startswith(MARKER):
            last = line[len(MARKER) :].rstrip("\r\n")
        else:
            kept.append(line)
    if last is None:  # the marker only appeared mid-line
        return stdout, None, None, False
    try:
        return "".join(kept), json.loads(last), None, True
    except ValueError as exc:
        return stdout, None, f"invalid JSON on the OUTPUT_STATE line: {exc}", True
