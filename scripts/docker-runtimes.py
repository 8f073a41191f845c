#!/usr/bin/env python3
"""Merge execbox's Docker runtimes (execbox/engine/docker-runtimes.json) into a daemon.json,
with ``"experimental": true`` (checkpoints of gVisor sandboxes: pausing sessions to disk).

Usage: docker-runtimes.py DAEMON_JSON RUNTIMES_JSON. Keeps every other key and runtime
of an existing file; refuses (exit 1) a file that is not a JSON object rather than
replace it; writes atomically, only when something changes. Prints "changed" or
"unchanged". Run by scripts/setup.sh with the system's python3 (no .venv needed yet).
"""

import json
import os
import sys


def main(daemon_json: str, runtimes_json: str) -> int:
    with open(runtimes_json) as f:
        ours = json.load(f)
    try:
        with open(daemon_json) as f:
            config = json.load(f)
    except FileNotFoundError:
        config = {}
    except json.JSONDecodeError as exc:
        print(f"{daemon_json} is not valid JSON ({exc}): fix it, then run setup again", file=sys.stderr)
        return 1
    if not isinstance(config, dict) or not isinstance(config.get("runtimes", {}), dict):
        print(f"{daemon_json}: expected a JSON object with an object 'runtimes'", file=sys.stderr)
        return 1
    runtimes = config.setdefault("runtimes", {})
    # Checkpoints (pausing gVisor sessions to disk) need dockerd's experimental mode.
    if all(runtimes.get(name) == spec for name, spec in ours.items()) and config.get("experimental") is True:
        print("unchanged")
        return 0
    runtimes.update(ours)
    config["experimental"] = True
    os.makedirs(os.path.dirname(daemon_json) or ".", exist_ok=True)
    tmp = f"{daemon_json}.execbox-tmp"
    with open(tmp, "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    os.replace(tmp, daemon_json)
    print("changed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
