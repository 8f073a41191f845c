"""The egress proxy, for real: mitmproxy with execbox's addons on loopback, real upstream
servers of the tests' own (HTTP, and HTTPS with a self-signed certificate) mapped to test
hostnames by the host map, real clients (urllib, http.client) on the host."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from execbox.egress import EgressHook, HookContext, HookRequest, HookResponse, NetworkPolicy, Rule
from execbox.egress.addresses import system_resolver
from execbox.egress.ca import ensure_ca
from execbox.egress.proxy import EgressProxy
from execbox.egress.runs import BoundSecret, RunRegistry, RunState

from .egress_support import OTHER_HOST, PLAIN_HOST, SECURE_HOST, Listener, Upstream, self_signed, start_upstream

STRIPE_HOST = "api.stripe.test"
RAW_HOST = "raw.example.test"


# -- the seed's hook examples -------------------------------------------------------------


class InjectStripeKey(EgressHook):
    def request(self, ctx: HookContext, request: HookRequest) -> None:
        if request.host == STRIPE_HOST:
            request.headers["Authorization"] = "Bearer sk_test_from_hook"


class BlockDelete(EgressHook):
    def request(self, ctx: HookContext, request: HookRequest) -> None:
        if request.host == STRIPE_HOST and request.method == "DELETE":
            request.block("DELETE requests are not allowed")


class MockCustomer(EgressHook):
    def request(self, ctx: HookContext, request: HookRequest) -> None:
        if request.host == STRIPE_HOST and request.path.startswith("/v1/customers/cus_mock"):
            request.respond(200, {"id": "cus_mock", "object": "customer", "email": "mock@example.test"})


class AddResponseHeader(EgressHook):
    def response(self, ctx: HookContext, request: HookRequest, response: HookResponse) -> None:
        response.headers["X-Execbox-Proxied"] = "yes"


class InjectMetadata(EgressHook):
    def response(self, ctx: HookContext, request: HookRequest, response: HookResponse) -> None:
        if request.host == STRIPE_HOST and response.headers.get("content-type", "").startswith("application/json"):
            data = response.json()
            data["_metadata"] = {"run": ctx.run_id, "tenant": ctx.tenant, "user": ctx.user_id}
            response.set_json(data)


class Explodes(EgressHook):
    """Raises when the request asks for it: hooks that fail must fail closed."""

    def request(self, ctx: HookContext, request: HookRequest) -> None:
        if request.headers.get("x-explode") == "request":
            raise RuntimeError("hook bug")

    def response(self, ctx: HookContext, request: HookRequest, response: HookResponse) -> None:
        if request.headers.get("x-explode") == "response":
            raise RuntimeError("hook bug")


# -- fixtures ---------------------------------------------------------------------------


@dataclass
class Env:
    proxy: EgressProxy
    registry: RunRegistry
    plain: Upstream
    secure: Upstream
    ca_file: Path
    raw: Listener

    def run(self, run_id: str, *policies: NetworkPolicy, secrets: tuple[BoundSecret, ...] = ()) -> Client:
        user, password = self.registry.new_credential(run_id)
        self.registry.add(
            RunState(run_id, user, password, policies, secrets=secrets, tenant="acme", user_id="u1", max_log=50)
        )
        return Client(self, run_id, user, password)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Client:
    env: Env
    run_id: str
    user: str
    password: str

    @property
    def proxy_url(self) -> str:
        return f"http://{self.user}:{self.password}@127.0.0.1:{self.env.proxy.port}"

    def request(
        self, url: str, method: str = "GET", headers: dict[str, str] | None = None, body: bytes | None = None
    ) -> Response:
        ctx = ssl.create_default_context(cafile=str(self.env.ca_file))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({"http": self.proxy_url, "https": self.proxy_url}),
            urllib.request.HTTPSHandler(context=ctx),
        )
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "https":
            # A tunnel refused at CONNECT: urllib would keep only the status line of the answer.
            refused = self.connect(parts.hostname or "", parts.port or 443)
            if refused.status != 200:
                return refused
        req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
        try:
            with opener.open(req, timeout=20) as resp:
                return Response(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return Response(exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read())

    def connect(self, host: str, port: int) -> Response:
        """The proxy's answer to a CONNECT (200: the tunnel is closed again at once)."""
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        with socket.create_connection(("127.0.0.1", self.env.proxy.port), timeout=20) as sock:
            target = f"{host}:{port}"
            auth = f"Proxy-Authorization: Basic {token}\r\n"
            sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        return Response(int(lines[0].split()[1]), fields, rest)

    def log(self) -> list[Any]:
        state = self.env.registry.get(self.run_id)
        assert state is not None
        return state.entries()


async def _resolver(host: str, port: int) -> list[str]:
    if host.endswith(".boom.test"):
        raise RuntimeError("resolver bug")
    if host == "rebind.example.test":  # a public-looking name that resolves to loopback
        return ["127.0.0.1"]
    return await system_resolver()(host, port)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("egress")
    cert, tls = self_signed(tmp)
    plain, secure = start_upstream(), start_upstream(tls=tls)
    raw = Listener("127.0.0.1")
    registry = RunRegistry()
    ensure_ca(tmp / "ca")
    proxy = EgressProxy(
        registry,
        listen_host="127.0.0.1",
        listen_port=0,
        ca_dir=tmp / "ca",
        host_map={
            PLAIN_HOST: f"127.0.0.1:{plain.port}",
            OTHER_HOST: f"127.0.0.1:{plain.port}",
            STRIPE_HOST: f"127.0.0.1:{plain.port}",
            SECURE_HOST: f"127.0.0.1:{secure.port}",
            RAW_HOST: f"127.0.0.1:{raw.port}",
        },
        hooks_=[InjectStripeKey(), BlockDelete(), MockCustomer(), AddResponseHeader(), InjectMetadata(), Explodes()],
        upstream_ca_file=cert,
        resolver=_resolver,
    )
    proxy.start()
    yield Env(proxy, registry, plain, secure, tmp / "ca" / "mitmproxy-ca-cert.pem", raw)
    proxy.stop()
    raw.close()
    plain.close()
    secure.close()


@pytest.fixture(autouse=True)
def _clear_hits(env: Env) -> None:
    env.plain.hits.clear()
    env.secure.hits.clear()


def allow(*rules: Any, **kw: Any) -> NetworkPolicy:
    return NetworkPolicy(mode="proxy", allow=rules, **kw)


# -- attribution ------------------------------------------------------------------------


def test_no_credential_is_407_and_never_reaches_upstream(env: Env) -> None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://127.0.0.1:{env.proxy.port}"}))
    with pytest.raises(urllib.error.HTTPError) as err:
        opener.open(f"http://{PLAIN_HOST}/", timeout=10)
    assert err.value.code == 407
    err.value.close()
    bad = Client(env, "nobody", "run-0000", "wrong")
    assert bad.request(f"http://{PLAIN_HOST}/").status == 407
    assert env.plain.hits == [] and env.secure.hits == []


def test_https_connect_without_credential_is_refused(env: Env) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", env.proxy.port, timeout=10)
    conn.request("CONNECT", f"{SECURE_HOST}:443", headers={"Host": f"{SECURE_HOST}:443"})
    assert conn.getresponse().status == 407
    conn.close()
    assert env.secure.hits == []


def test_finished_run_credential_stops_working(env: Env) -> None:
    client = env.run("finished", allow(PLAIN_HOST))
    assert client.request(f"http://{PLAIN_HOST}/a").status == 200
    env.registry.pop("finished")
    assert client.request(f"http://{PLAIN_HOST}/b").status == 407
    assert [h["path"] for h in env.plain.hits] == ["/a"]


# -- policy -----------------------------------------------------------------------------


def test_allowed_http_and_https_reach_their_upstream(env: Env) -> None:
    client = env.run("allowed", allow(PLAIN_HOST, SECURE_HOST))
    r = client.request(f"http://{PLAIN_HOST}/hello?x=1")
    assert r.status == 200 and r.json()["path"] == "/hello?x=1"
    r = client.request(f"https://{SECURE_HOST}/secure", method="POST", body=b"payload")
    assert r.status == 200 and r.json()["body"] == "payload"
    assert [h["path"] for h in env.secure.hits] == ["/secure"]
    # The proxy-authorization header never travels upstream.
    assert all("proxy-authorization" not in h["headers"] for h in env.plain.hits + env.secure.hits)
    log = client.log()
    assert [(e.method, e.url, e.status, e.decision) for e in log] == [
        ("GET", f"http://{PLAIN_HOST}/hello?x=1", 200, "allowed"),
        ("POST", f"https://{SECURE_HOST}/secure", 200, "allowed"),
    ]
    assert log[1].request_bytes == 7 and log[1].response_bytes > 0 and log[1].duration_ms > 0
    assert log[0].rule == f"allow:{PLAIN_HOST}"


def test_default_deny_is_a_403_with_a_reason_and_a_log_entry(env: Env) -> None:
    client = env.run("default-deny", allow(PLAIN_HOST))
    for url in (f"http://{OTHER_HOST}/x", f"https://{SECURE_HOST}/x"):
        r = client.request(url)
        assert r.status == 403
        assert "not allowed" in r.headers["x-execbox-denied"]
        assert r.headers["x-execbox-rule"] == "default-deny"
    assert env.plain.hits == [] and env.secure.hits == []
    assert [(e.decision, e.rule, e.status) for e in client.log()] == [("denied", "default-deny", 403)] * 2


def test_deny_wins_and_rules_match_methods_and_path_prefixes(env: Env) -> None:
    policy = NetworkPolicy(
        mode="proxy",
        allow=["*.example.test", Rule(host=STRIPE_HOST, methods=["GET"], paths=["/v1/charges"])],
        deny=[OTHER_HOST, Rule(host=PLAIN_HOST, methods=["POST"], paths=["/admin"])],
    )
    client = env.run("rules", policy)
    assert client.request(f"http://{PLAIN_HOST}/admin").status == 200  # GET is not denied
    assert client.request(f"http://{PLAIN_HOST}/admin/x", method="POST", body=b"1").status == 403
    assert client.request(f"http://{PLAIN_HOST}/administrator", method="POST", body=b"1").status == 200
    assert client.request(f"http://{OTHER_HOST}/").status == 403  # deny wins over *.example.test
    assert client.request(f"http://{STRIPE_HOST}/v1/charges/ch_1").status == 200
    assert client.request(f"http://{STRIPE_HOST}/v1/refunds").status == 403
    assert client.request(f"http://{STRIPE_HOST}/v1/charges/../refunds").status == 403  # dot segments: ambiguous
    assert client.request(f"http://{STRIPE_HOST}/v1/charges", method="PUT", body=b"1").status == 403
    assert [h["path"] for h in env.plain.hits] == ["/admin", "/administrator", "/v1/charges/ch_1"]


def test_tenant_ceiling_caps_the_request_policy(env: Env) -> None:
    ceiling = allow(PLAIN_HOST)
    client = env.run("ceiling", ceiling, allow(PLAIN_HOST, SECURE_HOST))
    assert client.request(f"http://{PLAIN_HOST}/").status == 200
    assert client.request(f"https://{SECURE_HOST}/").status == 403


def test_private_and_loopback_destinations_are_refused_on_the_resolved_address(env: Env) -> None:
    target = Listener("127.0.0.1")
    try:
        client = env.run("private", allow("*"))
        for url in (
            f"http://127.0.0.1:{target.port}/",  # IP literal
            f"http://localhost:{target.port}/",  # a name resolving to loopback
            f"http://rebind.example.test:{target.port}/",  # allowed name, private answer (rebinding)
            f"https://127.0.0.1:{target.port}/",
            f"http://[::1]:{target.port}/",
        ):
            r = client.request(url)
            assert r.status == 403, url
            assert r.headers["x-execbox-rule"] == "private-address", url
        assert target.hits == 0
        assert {e.rule for e in client.log()} == {"private-address"}
    finally:
        target.close()


def test_host_header_must_match_the_destination(env: Env) -> None:
    client = env.run("fronting", allow(PLAIN_HOST))
    # Plain HTTP: absolute URL to an allowed host, Host header naming another.
    r = client.request(f"http://{PLAIN_HOST}/", headers={"Host": OTHER_HOST})
    assert r.status == 403 and r.headers["x-execbox-rule"] == "host-mismatch"
    # HTTPS: a tunnel to an allowed host, with a request for another inside.
    client2 = env.run("fronting-tls", allow(SECURE_HOST))
    conn = http.client.HTTPSConnection(
        "127.0.0.1", env.proxy.port, context=ssl.create_default_context(cafile=str(env.ca_file)), timeout=10
    )
    conn.set_tunnel(SECURE_HOST, 443, headers={"Proxy-Authorization": _basic(client2.user, client2.password)})
    conn.request("GET", "/", headers={"Host": OTHER_HOST})
    resp = conn.getresponse()
    assert resp.status == 403 and resp.getheader("x-execbox-rule") == "host-mismatch"
    conn.close()
    assert env.plain.hits == [] and env.secure.hits == []


def _basic(user: str, password: str) -> str:
    import base64

    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def test_non_http_inside_a_tunnel_is_cut(env: Env) -> None:
    """A tunnel to an allowed host that carries something else than HTTP never reaches it."""
    import socket

    client = env.run("raw-tcp", allow(RAW_HOST))
    before = env.raw.hits
    for payload in (b"\x00\x01binary-protocol\r\n\r\n", b"SSH-2.0-OpenSSH_9.2\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", env.proxy.port), timeout=10) as sock:
            auth = _basic(client.user, client.password)
            sock.sendall(f"CONNECT {RAW_HOST}:22 HTTP/1.1\r\nProxy-Authorization: {auth}\r\n\r\n".encode())
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
            sock.sendall(payload)
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
        assert b"reached" not in data
    assert env.raw.hits == before
    # The same host, spoken to in HTTP, is reachable: the cut is about the protocol.
    assert client.request(f"http://{RAW_HOST}/").body == b"reached"


# -- redaction --------------------------------------------------------------------------


def test_sensitive_response_headers_are_removed_and_log_headers_redacted(env: Env) -> None:
    client = env.run("redact", allow(PLAIN_HOST, redact_headers=["x-custom-token"]))
    r = client.request(
        f"http://{PLAIN_HOST}/cookie",
        headers={"Authorization": "Bearer visible-to-upstream", "X-Custom-Token": "t0k3n", "Cookie": "a=b"},
    )
    assert r.status == 200
    assert "set-cookie" not in r.headers and "x-api-key" not in r.headers
    assert env.plain.hits[0]["headers"]["authorization"] == "Bearer visible-to-upstream"
    (entry,) = client.log()
    assert entry.request_headers["authorization"] == "[REDACTED]"
    assert entry.request_headers["x-custom-token"] == "[REDACTED]"
    assert entry.request_headers["cookie"] == "[REDACTED]"
    assert entry.response_headers["set-cookie"] == "[REDACTED]"
    assert entry.response_headers["x-api-key"] == "[REDACTED]"
    dumped = json.dumps([e.model_dump() for e in client.log()])
    for value in ("visible-to-upstream", "t0k3n", "abc123", "upstream-key-xyz"):
        assert value not in dumped


def test_stripping_response_headers_can_be_turned_off(env: Env) -> None:
    client = env.run("nostrip", allow(PLAIN_HOST, strip_response_headers=False))
    r = client.request(f"http://{PLAIN_HOST}/cookie")
    assert r.headers["set-cookie"].startswith("session=abc123")


# -- secrets ----------------------------------------------------------------------------

REAL = "sk_live_REALVALUE_123456"
PLACEHOLDER = "execbox-secret-0123456789abcdef0123456789abcdef"


def test_secret_placeholder_is_swapped_on_bound_hosts_and_scrubbed_from_responses(env: Env) -> None:
    secret = BoundSecret("STRIPE_KEY", PLACEHOLDER, REAL, (PLAIN_HOST, SECURE_HOST))
    client = env.run("secrets", allow(PLAIN_HOST, SECURE_HOST, OTHER_HOST), secrets=(secret,))
    r = client.request(
        f"http://{PLAIN_HOST}/charge?key={PLACEHOLDER}",
        method="POST",
        headers={"Authorization": f"Bearer {PLACEHOLDER}", "X-Other": PLACEHOLDER},
        body=json.dumps({"key": PLACEHOLDER}).encode(),
    )
    hit = env.plain.hits[0]
    assert hit["headers"]["authorization"] == f"Bearer {REAL}"
    assert hit["headers"]["x-other"] == REAL
    assert hit["path"] == f"/charge?key={REAL}"
    assert json.loads(hit["body"]) == {"key": REAL}
    # The upstream echoed the real value back: the sandbox sees the placeholder.
    assert r.status == 200 and REAL.encode() not in r.body and PLACEHOLDER.encode() in r.body
    r = client.request(f"https://{SECURE_HOST}/s", headers={"Authorization": f"Bearer {PLACEHOLDER}"})
    assert env.secure.hits[0]["headers"]["authorization"] == f"Bearer {REAL}"
    assert REAL.encode() not in r.body
    assert REAL not in json.dumps([e.model_dump() for e in client.log()])


def test_secret_placeholder_sent_to_an_unbound_host_is_blocked_and_logged(env: Env) -> None:
    secret = BoundSecret("STRIPE_KEY", PLACEHOLDER, REAL, (PLAIN_HOST,))
    client = env.run("misuse", allow(PLAIN_HOST, OTHER_HOST, SECURE_HOST), secrets=(secret,))
    for kwargs in (
        {"url": f"http://{OTHER_HOST}/?k={PLACEHOLDER}"},
        {"url": f"http://{OTHER_HOST}/", "headers": {"X-Key": PLACEHOLDER}},
        {"url": f"https://{SECURE_HOST}/", "method": "POST", "body": PLACEHOLDER.encode()},
    ):
        r = client.request(**kwargs)  # type: ignore[arg-type]
        assert r.status == 403 and r.headers["x-execbox-rule"] == "secret-misuse"
    assert env.plain.hits == [] and env.secure.hits == []
    assert [e.rule for e in client.log()] == ["secret-misuse"] * 3


# -- hooks (the seed's examples) --------------------------------------------------------


def test_hook_injects_a_stripe_key(env: Env) -> None:
    client = env.run("hook-key", allow(STRIPE_HOST))
    r = client.request(f"http://{STRIPE_HOST}/v1/charges")
    assert env.plain.hits[0]["headers"]["authorization"] == "Bearer sk_test_from_hook"
    assert r.status == 200
    assert client.log()[0].request_headers["authorization"] == "[REDACTED]"


def test_hook_blocks_delete(env: Env) -> None:
    client = env.run("hook-delete", allow(STRIPE_HOST))
    r = client.request(f"http://{STRIPE_HOST}/v1/customers/cus_1", method="DELETE")
    assert r.status == 403 and r.headers["x-execbox-rule"] == "hook:BlockDelete"
    assert r.headers["x-execbox-denied"] == "DELETE requests are not allowed"
    assert env.plain.hits == []


def test_hook_mocks_a_stripe_customer(env: Env) -> None:
    client = env.run("hook-mock", allow(STRIPE_HOST))
    r = client.request(f"http://{STRIPE_HOST}/v1/customers/cus_mock")
    assert r.status == 200 and r.json()["id"] == "cus_mock"
    assert env.plain.hits == []
    (entry,) = client.log()
    assert entry.decision == "mocked" and entry.rule == "hook:MockCustomer"


def test_hooks_add_a_response_header_and_inject_json_metadata(env: Env) -> None:
    client = env.run("hook-meta", allow(STRIPE_HOST, PLAIN_HOST))
    r = client.request(f"http://{STRIPE_HOST}/v1/balance")
    assert r.headers["x-execbox-proxied"] == "yes"
    assert r.json()["_metadata"] == {"run": "hook-meta", "tenant": "acme", "user": "u1"}
    assert r.json()["path"] == "/v1/balance"
    r = client.request(f"http://{PLAIN_HOST}/plain")
    assert "_metadata" not in r.json() and r.headers["x-execbox-proxied"] == "yes"


# -- fail closed ------------------------------------------------------------------------


def test_a_hook_that_raises_on_the_request_denies_it(env: Env) -> None:
    client = env.run("explode-req", allow(PLAIN_HOST))
    r = client.request(f"http://{PLAIN_HOST}/", headers={"X-Explode": "request"})
    assert r.status == 403 and r.headers["x-execbox-rule"] == "hook-error:Explodes"
    assert env.plain.hits == []


def test_a_hook_that_raises_on_the_response_withholds_it(env: Env) -> None:
    client = env.run("explode-resp", allow(PLAIN_HOST))
    r = client.request(f"http://{PLAIN_HOST}/cookie", headers={"X-Explode": "response"})
    assert r.status == 502 and r.headers["x-execbox-rule"] == "hook-error:Explodes"
    assert b"abc123" not in r.body and b"cookie" not in r.body  # nothing of the upstream's answer
    assert len(env.plain.hits) == 1


def test_an_addon_error_fails_closed(env: Env) -> None:
    client = env.run("resolver-bug", allow("*.boom.test"))
    r = client.request("http://api.boom.test/")
    assert r.status == 403 and r.headers["x-execbox-rule"] == "internal-error"
    (entry,) = client.log()
    assert entry.decision == "denied"


# -- concurrency ------------------------------------------------------------------------


def test_concurrent_runs_keep_their_own_policy_and_log(env: Env) -> None:
    a = env.run("conc-a", allow(PLAIN_HOST))
    b = env.run("conc-b", allow(SECURE_HOST))
    results: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}

    def work(name: str, client: Client) -> None:
        for _ in range(8):
            results[name].append(
                (
                    client.request(f"http://{PLAIN_HOST}/{name}").status,
                    client.request(f"https://{SECURE_HOST}/{name}").status,
                )
            )

    threads = [threading.Thread(target=work, args=("a", a)), threading.Thread(target=work, args=("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results["a"] == [(200, 403)] * 8
    assert results["b"] == [(403, 200)] * 8
    # a's HTTPS was refused at CONNECT (logged with the tunnel's host and port), b's HTTP per request.
    assert [e.url for e in a.log() if e.method == "CONNECT"] == [f"{SECURE_HOST}:443"] * 8
    assert {e.url.rsplit("/", 1)[1] for e in a.log() if e.method != "CONNECT"} == {"a"}
    assert {e.url.rsplit("/", 1)[1] for e in b.log()} == {"b"}
    assert len(a.log()) == 16 and len(b.log()) == 16
