"""The last-line gate: if a deciding addon crashes without its own guard (mitmproxy swallows
addon exceptions), the request is still denied. Real proxy, real upstream on loopback."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from execbox.egress import NetworkPolicy
from execbox.egress.addons.policy import PolicyCheck
from execbox.egress.ca import ensure_ca
from execbox.egress.proxy import EgressProxy
from execbox.egress.runs import RunRegistry, RunState

from .egress_support import PLAIN_HOST, Upstream, start_upstream


class CrashingPolicy:
    """A policy addon with a bug and no fail-closed guard."""

    def request(self, flow: Any) -> None:
        raise RuntimeError("policy bug")


class CrashingProxy(EgressProxy):
    def addons(self) -> list[Any]:
        return [CrashingPolicy() if isinstance(a, PolicyCheck) else a for a in super().addons()]


@pytest.fixture
def crashing(tmp_path: Path) -> Iterator[tuple[CrashingProxy, RunRegistry, Upstream]]:
    upstream = start_upstream()
    registry = RunRegistry()
    ensure_ca(tmp_path / "ca")
    proxy = CrashingProxy(
        registry,
        listen_host="127.0.0.1",
        listen_port=0,
        ca_dir=tmp_path / "ca",
        host_map={PLAIN_HOST: f"127.0.0.1:{upstream.port}"},
        hooks_=[],
    )
    proxy.start()
    yield proxy, registry, upstream
    proxy.stop()
    upstream.close()


def test_a_crashing_unguarded_addon_still_fails_closed(crashing: tuple[CrashingProxy, RunRegistry, Upstream]) -> None:
    proxy, registry, upstream = crashing
    user, password = registry.new_credential("r")
    registry.add(RunState("r", user, password, (NetworkPolicy(mode="proxy", allow=[PLAIN_HOST]),)))
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({"http": f"http://{user}:{password}@127.0.0.1:{proxy.port}"})
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        opener.open(f"http://{PLAIN_HOST}/", timeout=10)
    assert err.value.code == 403
    assert err.value.headers["x-execbox-rule"] == "undecided"
    err.value.close()
    assert upstream.hits == []
    state = registry.get("r")
    assert state is not None and [e.decision for e in state.entries()] == ["denied"]
