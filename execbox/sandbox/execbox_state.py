"""State helpers for programs run by execbox (Python).

from execbox_state import load_state, save_state
state = load_state({"counter": 0})
state["counter"] += 1
save_state(state)          # prints OUTPUT_STATE:<json>; the last one wins
"""

import json
import os
from typing import Any

__all__ = ["load_state", "save_state"]


def load_state(default: Any = None) -> Any:
    """The state given to this run (EXECBOX_STATE), or ``default`` (an empty dict if None)."""
    raw = os.environ.get("EXECBOX_STATE")
    if raw is None:
        return {} if default is None else default
    return json.loads(raw)


def save_state(state: Any) -> None:
    """Hand ``state`` back to execbox (it must be JSON-serializable)."""
    print("OUTPUT_STATE:" + json.dumps(state, separators=(",", ":")), flush=True)
