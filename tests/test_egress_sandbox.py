"""End to end: real sandboxes on the egress network, the real proxy, real upstreams on loopback.

Every bypass is tried from inside a sandbox against a server of the tests' own on
this machine that the sandbox must not reach (the network's gateway address, the
default bridge's address, another sandbox); nothing is sent anywhere else.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from execbox.egress import Egress, EgressGrant, EgressSettings, NetworkPolicy, Secret
from execbox.engine.base import Engine

from .egress_support import (
    OTHER_HOST,
    PLAIN_HOST,
    SECURE_HOST,
    Listener,
    SandboxResult,
    Upstream,
    run_in_sandbox,
    self_signed,
    start_upstream,
)
from .isolations import every_isolation  # noqa: F401 (runs this module under every isolation)

pytestmark = pytest.mark.docker


@dataclass
class World:
    engine: Engine
    egress: Egress
    plain: Upstream
    secure: Upstream
    gw_tcp: Listener  # on the egress network's gateway: the host, seen from the sandbox
    gw_udp: Listener
    bridge_tcp: Listener | None  # on the default bridge's gateway: another address of the host
    isolation: str = "container"

    def grant(self, *allow: str, secrets: dict[str, Secret] | None = None) -> EgressGrant:
        return self.egress.prepare(uuid.uuid4().hex[:12], NetworkPolicy(mode="proxy", allow=allow), secrets)

    def run(self, grant: EgressGrant, code: str, language: str = "python", **kw: Any) -> SandboxResult:
        return run_in_sandbox(
            self.engine,
            grant.network,
            code,
            language,
            env=dict(grant.env),
            files=dict(grant.files),
            uid=random.randrange(150_000, 199_999),
            isolation=self.isolation,
            **kw,
        )


def _docker0_gateway(engine: Any) -> str | None:
    try:
        config = engine.api.inspect_network("bridge")["IPAM"]["Config"]
        return str(config[0]["Gateway"])
    except Exception:
        return None


@pytest.fixture(scope="module")
def world(engine: Engine, tmp_path_factory: pytest.TempPathFactory, isolation: str) -> Iterator[World]:
    tmp: Path = tmp_path_factory.mktemp("egress-e2e")
    cert, tls = self_signed(tmp)
    plain, secure = start_upstream(), start_upstream(tls=tls)
    egress = Egress(
        engine,
        EgressSettings(
            ca_dir=tmp / "ca",
            host_map={
                PLAIN_HOST: f"127.0.0.1:{plain.port}",
                OTHER_HOST: f"127.0.0.1:{plain.port}",
                SECURE_HOST: f"127.0.0.1:{secure.port}",
            },
            upstream_ca_file=cert,
        ),
    )
    egress.start()
    gw_tcp, gw_udp = Listener(egress.gateway), Listener(egress.gateway, udp=True)
    docker0 = _docker0_gateway(engine)
    bridge_tcp = Listener(docker0) if docker0 else None
    try:
        yield World(engine, egress, plain, secure, gw_tcp, gw_udp, bridge_tcp, isolation)
    finally:
        egress.close()
        for listener in (gw_tcp, gw_udp, bridge_tcp):
            if listener is not None:
                listener.close()
        plain.close()
        secure.close()


# -- the common clients work, unmodified -------------------------------------------------

PYTHON_CLIENTS = """
import http.client, json, os, ssl, urllib.request, urllib.error
out = {}
def get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())["path"]
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("x-execbox-rule")
out["urllib_http"] = get("http://%(plain)s/py-urllib-http")
out["urllib_https"] = get("https://%(secure)s/py-urllib-https")
out["urllib_denied"] = get("http://%(other)s/py-denied")
c = http.client.HTTPConnection("%(plain)s", timeout=10)
c.request("GET", "/py-httpclient-http")
r = c.getresponse()
out["httpclient_http"] = [r.status, json.loads(r.read())["path"]]
c = http.client.HTTPSConnection("%(secure)s", timeout=10, context=ssl.create_default_context())
c.request("GET", "/py-httpclient-https")
r = c.getresponse()
out["httpclient_https"] = [r.status, json.loads(r.read())["path"]]
print(json.dumps(out))
"""


def test_python_urllib_and_http_client_go_through_the_proxy(world: World) -> None:
    grant = world.grant(PLAIN_HOST, SECURE_HOST)
    code = PYTHON_CLIENTS % {"plain": PLAIN_HOST, "secure": SECURE_HOST, "other": OTHER_HOST}
    out = world.run(grant, code).json()
    log = world.egress.finish(grant.run_id)
    assert out == {
        "urllib_http": [200, "/py-urllib-http"],
        "urllib_https": [200, "/py-urllib-https"],
        "urllib_denied": [403, "default-deny"],
        "httpclient_http": [200, "/py-httpclient-http"],
        "httpclient_https": [200, "/py-httpclient-https"],
    }
    assert sorted(e.url for e in log) == sorted(
        [
            f"http://{PLAIN_HOST}/py-urllib-http",
            f"https://{SECURE_HOST}/py-urllib-https",
            f"http://{OTHER_HOST}/py-denied",
            f"http://{PLAIN_HOST}/py-httpclient-http",
            f"https://{SECURE_HOST}/py-httpclient-https",
        ]
    )


NODE_CLIENTS = """
const http = require('http'), https = require('https');
function get(mod, url) {
  return new Promise((resolve) => {
    mod.get(url, (res) => {
      let b = '';
      res.on('data', (d) => (b += d));
      const what = () => (res.statusCode === 200 ? JSON.parse(b).path : res.headers['x-execbox-rule']);
      res.on('end', () => resolve([res.statusCode, what()]));
    })
      .on('error', (e) => resolve(['error', String(e.message)]));
  });
}
async function f(url, init) {
  try {
    const r = await fetch(url, init);
    const t = await r.text();
    return [r.status, r.status === 200 ? JSON.parse(t).path : r.headers.get('x-execbox-rule')];
  }
  catch (e) { return ['error', String(e.cause || e)]; }
}
(async () => {
  const out = {};
  out.http = await get(http, 'http://%(plain)s/node-http');
  out.https = await get(https, 'https://%(secure)s/node-https');
  out.fetch_http = await f('http://%(plain)s/node-fetch-http');
  out.fetch_https = await f('https://%(secure)s/node-fetch-https', {method: 'POST', body: 'x'});
  out.fetch_denied = await f('https://%(other)s/node-denied');
  out.http_denied = await get(http, 'http://%(other)s/node-denied2');
  console.log(JSON.stringify(out));
})();
"""


def test_node_http_https_and_fetch_go_through_the_proxy(world: World) -> None:
    grant = world.grant(PLAIN_HOST, SECURE_HOST)
    code = NODE_CLIENTS % {"plain": PLAIN_HOST, "secure": SECURE_HOST, "other": OTHER_HOST}
    result = world.run(grant, code, "javascript")
    out = result.json()
    world.egress.finish(grant.run_id)
    assert out == {
        "http": [200, "/node-http"],
        "https": [200, "/node-https"],
        "fetch_http": [200, "/node-fetch-http"],
        "fetch_https": [200, "/node-fetch-https"],
        # Node's preload tunnels every request: a denied host is refused at CONNECT, reason in the error.
        "fetch_denied": [
            "error",
            f"Error: egress proxy refused {OTHER_HOST}:443: HTTP/1.1 403 Forbidden"
            f" ({OTHER_HOST}:443 is not allowed by the policy)",
        ],
        "http_denied": [
            "error",
            f"egress proxy refused {OTHER_HOST}:80: HTTP/1.1 403 Forbidden"
            f" ({OTHER_HOST}:80 is not allowed by the policy)",
        ],
    }, result.stderr


# -- bypasses: the kernel, not politeness ------------------------------------------------

PYTHON_BYPASS = """
import json, os, socket, subprocess, urllib.request
out = {}
def tcp(host, port):
    try:
        s = socket.create_connection((host, port), timeout=3); s.close(); return "connected"
    except OSError as e:
        return type(e).__name__
real = socket.socket
def raw(host, port):  # a plain socket, no helper on the way
    s = real(socket.AF_INET, socket.SOCK_STREAM); s.settimeout(3)
    try:
        s.connect((host, port)); return "connected"
    except OSError as e:
        return type(e).__name__
    finally:
        s.close()
out["proxy_port"] = raw("%(gw)s", %(proxy_port)d)
out["gateway_other_port"] = raw("%(gw)s", %(gw_port)d)
out["bridge_address"] = raw("%(bridge)s", %(bridge_port)d) if "%(bridge)s" else "skipped"
out["loopback"] = raw("127.0.0.1", %(proxy_port)d)
# An IP literal with the proxy settings ignored.
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    opener.open("http://%(gw)s:%(gw_port)d/", timeout=3); out["ip_literal_no_proxy"] = "reached"
except Exception as e:
    out["ip_literal_no_proxy"] = type(e).__name__
# DNS: straight UDP queries to the host.
query = bytes.fromhex("abcd01000001000000000000076578616d706c65047465737400000f0001")
for name, port in (("dns_gateway_listener", %(udp_port)d), ("dns_gateway_53", 53)):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(2)
    try:
        s.sendto(query, ("%(gw)s", port)); s.recvfrom(512); out[name] = "answered"
    except OSError as e:
        out[name] = type(e).__name__
    finally:
        s.close()
# Python started without the preload (-I ignores PYTHONPATH): http.client direct to the gateway.
probe = (
    "import http.client; c=http.client.HTTPConnection('%(gw)s', %(gw_port)d, timeout=3);"
    "c.request('GET','/'); print(c.getresponse().status)"
)
p = subprocess.run(["python3", "-I", "-c", probe], capture_output=True, text=True)
out["python_isolated"] = "reached" if p.stdout.strip() else "failed"
print(json.dumps(out))
"""


def test_raw_sockets_ip_literals_and_dns_reach_nothing_but_the_proxy(world: World) -> None:
    grant = world.grant("*")  # even with everything allowed by policy
    bridge = world.bridge_tcp
    code = PYTHON_BYPASS % {
        "gw": world.egress.gateway,
        "proxy_port": world.egress.port,
        "gw_port": world.gw_tcp.port,
        "udp_port": world.gw_udp.port,
        "bridge": bridge.sock.getsockname()[0] if bridge else "",
        "bridge_port": bridge.port if bridge else 0,
    }
    before = (world.gw_tcp.hits, world.gw_udp.hits, bridge.hits if bridge else 0)
    result = world.run(grant, code)
    out = result.json()
    world.egress.finish(grant.run_id)
    assert out["proxy_port"] == "connected"  # the one thing reachable (proves the probe works)
    assert out["gateway_other_port"] in ("ConnectionRefusedError", "TimeoutError")
    assert out["bridge_address"] in ("ConnectionRefusedError", "TimeoutError", "skipped")
    assert out["loopback"] == "ConnectionRefusedError"
    assert out["ip_literal_no_proxy"] == "URLError"
    assert out["dns_gateway_listener"] in ("ConnectionRefusedError", "TimeoutError")
    assert out["dns_gateway_53"] in ("ConnectionRefusedError", "TimeoutError")
    assert out["python_isolated"] == "failed"
    assert (world.gw_tcp.hits, world.gw_udp.hits, bridge.hits if bridge else 0) == before


BASH_BYPASS = """
try() { if timeout 3 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null; then echo -n "open "; else echo -n "closed "; fi; }
try %(gw)s %(proxy_port)d
try %(gw)s %(gw_port)d
try %(gw)s 22
echo
"""


def test_bash_dev_tcp_reaches_only_the_proxy_port(world: World) -> None:
    grant = world.grant("*")
    before = world.gw_tcp.hits
    code = BASH_BYPASS % {"gw": world.egress.gateway, "proxy_port": world.egress.port, "gw_port": world.gw_tcp.port}
    result = world.run(grant, code, "bash")
    world.egress.finish(grant.run_id)
    assert result.stdout.split() == ["open", "closed", "closed"], result.stderr
    assert world.gw_tcp.hits == before


NODE_BYPASS = """
const net = require('net');
function tcp(host, port) {
  return new Promise((resolve) => {
    const s = net.connect({host, port, timeout: 3000});
    s.on('connect', () => { s.destroy(); resolve('connected'); });
    s.on('timeout', () => { s.destroy(); resolve('timeout'); });
    s.on('error', (e) => resolve(e.code));
  });
}
(async () => {
  const out = {};
  out.gateway_other_port = await tcp('%(gw)s', %(gw_port)d);
  out.proxy_port = await tcp('%(gw)s', %(proxy_port)d);
  // fetch to an IP literal of the host (the preload leaves the proxy's own address alone),
  // then with the preload's dispatcher replaced by a plain one.
  for (const key of ['fetch_ip_literal', 'fetch_plain_dispatcher']) {
    try {
      if (key === 'fetch_plain_dispatcher') {
        const sym = Symbol.for('undici.globalDispatcher.1');
        globalThis[sym] = new globalThis[sym].constructor();
      }
      await fetch('http://%(gw)s:%(gw_port)d/');
      out[key] = 'reached';
    } catch (e) { out[key] = String((e.cause && e.cause.code) || e); }
  }
  console.log(JSON.stringify(out));
})();
"""


def test_node_raw_sockets_and_a_bypassed_fetch_reach_nothing(world: World) -> None:
    grant = world.grant("*")
    before = world.gw_tcp.hits
    code = NODE_BYPASS % {"gw": world.egress.gateway, "proxy_port": world.egress.port, "gw_port": world.gw_tcp.port}
    result = world.run(grant, code, "javascript")
    out = result.json()
    log = world.egress.finish(grant.run_id)
    assert out["proxy_port"] == "connected", result.stderr
    assert out["gateway_other_port"] in ("ECONNREFUSED", "timeout")
    assert out["fetch_ip_literal"] == "ECONNREFUSED"
    assert out["fetch_plain_dispatcher"] == "ECONNREFUSED"
    assert world.gw_tcp.hits == before
    assert log == []


SERVER = """
import json, socket
s = socket.socket(); s.bind(("0.0.0.0", 8000)); s.listen(1); s.settimeout(%(wait)d)
print("listening", flush=True)
try:
    c, _ = s.accept(); print(json.dumps({"accepted": True})); c.close()
except OSError:
    print(json.dumps({"accepted": False}))
"""

CLIENT = """
import json, socket
r = socket.socket(); r.settimeout(3)
try:
    r.connect(("%(ip)s", 8000)); out = "connected"
except OSError as e:
    out = type(e).__name__
print(json.dumps({"connect": out}))
"""


def test_sandboxes_cannot_reach_each_other(world: World) -> None:
    a, b = world.grant("*"), world.grant("*")
    started = threading.Event()
    box: dict[str, Any] = {}

    def on_started(sid: str) -> None:
        nets = world.engine.api.inspect_container(sid)["NetworkSettings"]["Networks"]  # type: ignore[attr-defined]
        box["ip"] = nets[a.network]["IPAddress"]
        started.set()

    def server() -> None:
        box["server"] = world.run(a, SERVER % {"wait": 8}, on_started=on_started)

    t = threading.Thread(target=server)
    t.start()
    assert started.wait(30)
    client = world.run(b, CLIENT % {"ip": box["ip"]})
    t.join(60)
    world.egress.finish(a.run_id)
    world.egress.finish(b.run_id)
    assert client.json()["connect"] in ("TimeoutError", "ConnectionRefusedError")
    assert box["server"].json() == {"accepted": False}


# -- secrets, attribution, concurrency ----------------------------------------------------

REAL = "sk_live_e2e_REAL_4242424242"

SECRET_CODE = """
import json, os, urllib.request
key = os.environ["STRIPE_KEY"]
req = urllib.request.Request("http://%(plain)s/charge", headers={"Authorization": "Bearer " + key})
with urllib.request.urlopen(req, timeout=10) as r:
    echoed = json.loads(r.read())["headers"]["authorization"]
print(json.dumps({"env": key, "echoed": echoed}))
"""


def test_secrets_never_enter_the_sandbox(world: World) -> None:
    grant = world.grant(PLAIN_HOST, secrets={"STRIPE_KEY": Secret(value=REAL, hosts=[PLAIN_HOST])})
    inspected: list[str] = []

    def on_started(sid: str) -> None:
        inspected.append(json.dumps(world.engine.api.inspect_container(sid)))  # type: ignore[attr-defined]

    before = len(world.plain.hits)
    result = world.run(grant, SECRET_CODE % {"plain": PLAIN_HOST}, on_started=on_started)
    out = result.json()
    log = world.egress.finish(grant.run_id)
    placeholder = grant.env["STRIPE_KEY"]
    assert out == {"env": placeholder, "echoed": f"Bearer {placeholder}"}
    assert world.plain.hits[before]["headers"]["authorization"] == f"Bearer {REAL}"
    for text in (result.stdout, result.stderr, inspected[0], json.dumps([e.model_dump() for e in log])):
        assert REAL not in text
    assert all("PRIVATE KEY" not in text for text in grant.files.values())


CONCURRENT = """
import json, urllib.request, urllib.error
out = []
for url in ("http://%(plain)s/c", "https://%(secure)s/c"):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            out.append(r.status)
    except urllib.error.HTTPError as e:
        out.append(e.code)
    except urllib.error.URLError as e:  # HTTPS: refused when the tunnel is asked for
        out.append("refused" if "403" in str(e.reason) and "not allowed" in str(e.reason) else str(e.reason))
print(json.dumps(out))
"""


def test_concurrent_runs_with_different_policies(world: World) -> None:
    grants = {"plain": world.grant(PLAIN_HOST), "secure": world.grant(SECURE_HOST)}
    results: dict[str, Any] = {}

    def go(name: str) -> None:
        results[name] = world.run(grants[name], CONCURRENT % {"plain": PLAIN_HOST, "secure": SECURE_HOST}).json()

    threads = [threading.Thread(target=go, args=(n,)) for n in grants]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    logs = {n: world.egress.finish(g.run_id) for n, g in grants.items()}
    assert results == {"plain": [200, "refused"], "secure": [403, 200]}
    assert [e.decision for e in logs["plain"]] == ["allowed", "denied"]
    assert [e.decision for e in logs["secure"]] == ["denied", "allowed"]


# -- the firewall and the network ----------------------------------------------------------


def _iptables(tool: str = "iptables") -> str:
    return subprocess.run([tool, "-w", "-S"], capture_output=True, text=True, check=True).stdout


def test_firewall_rules_are_idempotent_and_network_is_labelled(world: World) -> None:
    fw = world.egress._firewall
    assert fw is not None
    before = _iptables()
    assert f"-A INPUT -i {fw.bridge} -j {fw.chain}" in before
    fw.install()
    assert _iptables() == before
    net = world.engine.api.inspect_network(world.egress.network)  # type: ignore[attr-defined]
    assert net["Internal"] is True
    assert net["Labels"]["execbox.managed"] == "1"
    assert net["Options"]["com.docker.network.bridge.enable_icc"] == "false"


def test_close_removes_rules_and_network(world: World) -> None:
    fw = world.egress._firewall
    assert fw is not None
    chain, name = fw.chain, world.egress.network
    world.egress.close()
    assert chain not in _iptables()
    assert chain not in _iptables("ip6tables")
    assert not world.engine.api.networks(names=[name])  # type: ignore[attr-defined]
    assert "DOCKER" in _iptables()  # Docker's own chains untouched
