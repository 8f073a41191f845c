"""Socket address families inside sandboxes: only what a program needs can be created.

Sockets are created only, never connected anywhere. Checked in an ordinary run,
an egress run, a run on a package image and a session: they share one seccomp
profile, and each path must really get it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from execbox import Executor
from execbox.engine.base import Engine
from execbox.state.sqlite import SQLiteStateStore
from tests.conftest import ours
from tests.isolations import every_isolation  # noqa: F401 (runs this module under every isolation)

from .test_sessions import sessions_over

pytestmark = pytest.mark.docker

PROBE = r"""
import errno, json, socket
def make(family, kind, proto=0):
    try:
        socket.socket(family, kind, proto).close()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def pair(family):
    try:
        a, b = socket.socketpair(family, socket.SOCK_STREAM)
        a.close(); b.close()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
print(json.dumps({
    "vsock": make(40, socket.SOCK_STREAM),
    "packet": make(17, socket.SOCK_RAW, 0x0300),
    "can": make(29, socket.SOCK_RAW, 1),
    "alg": make(38, socket.SOCK_SEQPACKET),
    "bluetooth": make(31, socket.SOCK_STREAM, 3),
    "netlink_audit": make(16, socket.SOCK_RAW, 9),
    "tcp": make(socket.AF_INET, socket.SOCK_STREAM),
    "udp": make(socket.AF_INET, socket.SOCK_DGRAM),
    "tcp6": make(socket.AF_INET6, socket.SOCK_STREAM),
    "unix": make(socket.AF_UNIX, socket.SOCK_STREAM),
    "netlink_route": make(16, socket.SOCK_RAW, 0),
    "unix_pair": pair(socket.AF_UNIX),
    "if_nameindex": [n for _, n in socket.if_nameindex()][:1],
}))
"""

EXPECTED = {
    "vsock": "EAFNOSUPPORT",
    "packet": "EAFNOSUPPORT",
    "can": "EAFNOSUPPORT",
    "alg": "EAFNOSUPPORT",
    "bluetooth": "EAFNOSUPPORT",
    "netlink_audit": "EPROTONOSUPPORT",
    "tcp": "ok",
    "udp": "ok",
    "tcp6": "ok",
    "unix": "ok",
    "netlink_route": "ok",
    "unix_pair": "ok",
}


def expected(isolation: str) -> dict[str, str]:
    """What the probe finds. Inside gVisor every refusal of the seccomp profile is EPERM: its
    runsc (20221219) ignores the profile's errno values (see execbox.seccomp)."""
    if isolation == "gvisor":
        return {name: "EPERM" if value != "ok" else value for name, value in EXPECTED.items()}
    return EXPECTED


def _check(stdout: str, isolation: str) -> None:
    got = json.loads(stdout)
    assert got.pop("if_nameindex") == ["lo"]  # getifaddrs()/if_nameindex() need netlink route
    assert got == expected(isolation)


@pytest.fixture(scope="module")
def ex(engine: Engine, isolation: str) -> Iterator[Executor]:
    executor = Executor(engine=engine, pool=False, isolation=isolation)
    yield executor
    executor.close()
    assert ours(engine) == []


def test_only_needed_socket_families_in_a_run(executor: Executor, isolation: str) -> None:
    r = executor.execute(PROBE, language="python")
    assert (r.exit_code, r.isolation) == (0, isolation), r.stderr
    _check(r.stdout, isolation)
    # Node uses getifaddrs() (netlink route) and ordinary sockets: both still work.
    r = executor.execute(
        "const os = require('os'), net = require('net');"
        "console.log(Object.keys(os.networkInterfaces()).join(','));"
        "const s = net.createServer().listen(0, '127.0.0.1', () => { console.log('listening'); s.close(); });"
    )
    assert (r.stdout, r.exit_code) == ("lo\nlistening\n", 0), r.stderr


def test_only_needed_socket_families_in_an_egress_run(ex: Executor, isolation: str) -> None:
    r = ex.execute(PROBE, language="python", network={"mode": "proxy", "allow": ["allowed.example.test"]})
    assert (r.exit_code, r.isolation) == (0, isolation), r.stderr
    got = json.loads(r.stdout)
    got.pop("if_nameindex")  # an egress sandbox has an interface on the internal network besides lo
    assert got == expected(isolation)


def test_only_needed_socket_families_on_a_package_image(ex: Executor, isolation: str) -> None:
    r = ex.execute(PROBE, language="python", image="data")
    assert (r.exit_code, r.isolation) == (0, isolation), r.stderr
    _check(r.stdout, isolation)


def test_only_needed_socket_families_in_a_session(engine: Engine, tmp_path: Path, isolation: str) -> None:
    store = SQLiteStateStore(tmp_path / "sessions.db")
    with sessions_over(engine, store) as sessions:
        s = sessions.create("alice", "python", isolation=isolation)
        r = sessions.execute(s.id, PROBE)
        assert (r.exit_code, r.isolation) == (0, isolation), r.stderr
        _check(r.stdout, isolation)
    store.close()
