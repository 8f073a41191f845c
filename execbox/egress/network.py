"""The internal network of egress sandboxes, and the host firewall rules around it.

Docker's ``internal`` network has no route out (Docker's FORWARD isolation rules
drop anything leaving the bridge) and, with ICC disabled, sandboxes on it cannot
reach each other. But the host itself answers on the bridge's gateway address, and
on every other address of the host, since the host's INPUT chain accepts: so execbox
adds its own chain, jumped to from INPUT for packets arriving on this bridge, that
accepts TCP to the proxy's address and port and rejects everything else (IPv6:
drops everything). Rules are tagged by chain name, added idempotently, and removed
on close, unless the network outlives the process (sandboxes still on it: sessions
that the next process adopts), which keeps them guarded meanwhile; after a crash
they only match a bridge that no longer exists (harmless), and
``sweep_stale_chains`` removes them.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
from pathlib import Path

from ..engine.base import Engine, NetworkInfo
from ..exceptions import ConfigurationError, EngineError
from ..labels import EXPIRES, OWNER, labels_for

__all__ = ["CHAIN_PREFIX", "EgressNetwork", "Firewall", "NetworkInfo", "sweep_stale_chains"]

log = logging.getLogger("execbox.egress.network")

CHAIN_PREFIX = "EXECBOX-"
BRIDGE_PREFIX = "exb"
NETWORK_TTL = 30 * 24 * 3600  # the owner's death, not expiry, collects a live service's network


class EgressNetwork:
    """Create (or find) and remove the internal network, through the engine."""

    def __init__(self, engine: Engine, name: str | None = None) -> None:
        self.engine = engine
        suffix = secrets.token_hex(4)
        self.generated = name is None
        self.name = name or f"execbox-egress-{suffix}"
        self.bridge = BRIDGE_PREFIX + (suffix if name is None else secrets.token_hex(4))
        self.info: NetworkInfo | None = None

    def ensure(self) -> NetworkInfo:
        labels = labels_for("egress-network", ttl=NETWORK_TTL)
        if not self.generated:
            # A named network outlives the process (sessions on it are adopted by the next one):
            # neither this process's death nor an expiry makes it an orphan.
            labels.pop(OWNER, None)
            labels.pop(EXPIRES, None)
        self.info = self.engine.ensure_internal_network(self.name, self.bridge, labels)
        self.bridge = self.info.bridge
        return self.info

    def remove(self) -> bool:
        """Remove the network; False if it could not be (sandboxes, e.g. live sessions, are still on it)."""
        try:
            self.engine.remove_network(self.name)
        except EngineError as exc:
            log.warning("could not remove egress network %s (sandboxes still on it?): %s", self.name, exc)
            return False
        finally:
            self.info = None
        return True


def _run(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([tool, "-w", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise ConfigurationError(f"{tool} {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


class Firewall:
    """INPUT rules for one bridge: its sandboxes reach ``gateway:port`` (TCP) and nothing else on the host."""

    def __init__(self, bridge: str, gateway: str, port: int) -> None:
        self.bridge, self.gateway, self.port = bridge, gateway, port
        self.chain = CHAIN_PREFIX + bridge.upper()
        self.tools = [t for t in ("iptables", "ip6tables") if shutil.which(t)]
        if "iptables" not in self.tools:
            raise ConfigurationError("egress needs iptables on the host (apt-get install iptables)")

    def _rules(self, tool: str) -> list[list[str]]:
        if tool == "ip6tables":
            return [["-j", "DROP"]]
        return [
            ["-p", "tcp", "-d", self.gateway, "--dport", str(self.port), "-j", "ACCEPT"],
            ["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"],
            ["-j", "REJECT", "--reject-with", "icmp-port-unreachable"],
        ]

    def install(self) -> None:
        """Add (or re-add) the chain and the jump; safe to call again."""
        for tool in self.tools:
            _run(tool, "-N", self.chain, check=False)  # exists already: fine, it is ours
            _run(tool, "-F", self.chain)
            for rule in self._rules(tool):
                _run(tool, "-A", self.chain, *rule)
            jump = ["INPUT", "-i", self.bridge, "-j", self.chain]
            if _run(tool, "-C", *jump, check=False).returncode != 0:
                _run(tool, "-I", *jump[:1], "1", *jump[1:])

    def remove(self) -> None:
        """Remove the jump(s) and the chain; no error if they are already gone."""
        for tool in self.tools:
            _remove_chain(tool, self.chain, self.bridge)


def _remove_chain(tool: str, chain: str, bridge: str) -> None:
    for _ in range(16):  # every duplicate jump
        if _run(tool, "-D", "INPUT", "-i", bridge, "-j", chain, check=False).returncode != 0:
            break
    _run(tool, "-F", chain, check=False)
    _run(tool, "-X", chain, check=False)


def sweep_stale_chains() -> list[str]:
    """Remove execbox chains whose bridge no longer exists (left by a crashed process)."""
    removed: list[str] = []
    for tool in ("iptables", "ip6tables"):
        if not shutil.which(tool):
            continue
        listing = _run(tool, "-S", "INPUT", check=False).stdout
        for line in listing.splitlines():
            parts = line.split()
            if "-j" not in parts or "-i" not in parts:
                continue
            chain, bridge = parts[parts.index("-j") + 1], parts[parts.index("-i") + 1]
            if chain.startswith(CHAIN_PREFIX) and bridge.startswith(BRIDGE_PREFIX):
                if not Path(f"/sys/class/net/{bridge}").exists():
                    _remove_chain(tool, chain, bridge)
                    removed.append(f"{tool}:{chain}")
    return removed


def firewall_supported() -> bool:
    return os.geteuid() == 0 and shutil.which("iptables") is not None
