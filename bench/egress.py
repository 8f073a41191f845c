"""What egress costs: the proxy's added latency per request, and the extra cost of a run with egress.

    .venv/bin/python bench/egress.py [--requests 200] [--runs 15] [--pooled 40]

Everything stays on this machine: upstream servers of the benchmark's own on loopback,
mapped to test hostnames by the proxy's host map; sandboxes on the egress network.
Requests open a new connection each time (no keep-alive), from the host, directly vs
through the proxy; runs are `print(1)` / `console.log(1)` in a fresh sandbox without
network vs on the egress network (prepare + run + finish). Then, through an Executor
with its warm pool: paced `print(1)` runs (each waits until a ready sandbox is there, so
every run is a pool hit) without network vs with egress. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import random
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from execbox.egress import Egress, EgressSettings, NetworkPolicy  # noqa: E402
from execbox.engine import open_engine  # noqa: E402
from tests.egress_support import PLAIN_HOST, SECURE_HOST, run_in_sandbox, self_signed, start_upstream  # noqa: E402


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def timed(fn: Callable[[], object], n: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def row(label: str, xs: list[float]) -> None:
    print(f"  {label:<34} p50 {pct(xs, 50):8.2f} ms   p95 {pct(xs, 95):8.2f} ms   (n={len(xs)})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--pooled", type=int, default=40, help="paced pooled runs per kind (0: skip)")
    ap.add_argument("--only-pooled", action="store_true", help="only the pooled comparison")
    args = ap.parse_args()
    n, runs = min(args.requests, 2000), min(args.runs, 100)
    if args.pooled:
        pooled(min(args.pooled, 200))
    if args.only_pooled:
        return

    tmp = Path(tempfile.mkdtemp(prefix="execbox-bench-egress-"))
    cert, tls = self_signed(tmp)
    plain, secure = start_upstream(), start_upstream(tls=tls)
    engine = open_engine()
    t0 = time.perf_counter()
    egress = Egress(
        engine,
        EgressSettings(
            ca_dir=tmp / "ca",
            host_map={PLAIN_HOST: f"127.0.0.1:{plain.port}", SECURE_HOST: f"127.0.0.1:{secure.port}"},
            upstream_ca_file=cert,
        ),
    )
    egress.start()
    print(f"egress start (CA, network, proxy, firewall): {(time.perf_counter() - t0) * 1000:.0f} ms")
    try:
        policy = NetworkPolicy(mode="proxy", allow=[PLAIN_HOST, SECURE_HOST])
        grant = egress.prepare("bench", policy)
        user_pass = grant.env["HTTP_PROXY"].split("//", 1)[1].split("@", 1)[0]
        auth = {"Proxy-Authorization": "Basic " + base64.b64encode(user_pass.encode()).decode()}
        direct_tls = ssl.create_default_context(cafile=str(cert))
        direct_tls.check_hostname = False
        proxy_tls = ssl.create_default_context(cafile=str(tmp / "ca" / "mitmproxy-ca-cert.pem"))

        def direct_http() -> None:
            c = http.client.HTTPConnection("127.0.0.1", plain.port, timeout=10)
            c.request("GET", "/", headers={"Host": PLAIN_HOST})
            c.getresponse().read()
            c.close()

        def proxied_http() -> None:
            c = http.client.HTTPConnection(egress.gateway, egress.port, timeout=10)
            c.request("GET", f"http://{PLAIN_HOST}/", headers=auth)
            c.getresponse().read()
            c.close()

        def direct_https() -> None:
            c = http.client.HTTPSConnection("127.0.0.1", secure.port, timeout=10, context=direct_tls)
            c.request("GET", "/", headers={"Host": SECURE_HOST})
            c.getresponse().read()
            c.close()

        def proxied_https() -> None:
            c = http.client.HTTPSConnection(egress.gateway, egress.port, timeout=10, context=proxy_tls)
            c.set_tunnel(SECURE_HOST, 443, headers=auth)
            c.request("GET", "/")
            c.getresponse().read()
            c.close()

        print(f"\nper request, new connection each, from the host ({n} each):")
        results = {}
        for label, fn in (
            ("HTTP direct", direct_http),
            ("HTTP through the proxy", proxied_http),
            ("HTTPS direct", direct_https),
            ("HTTPS through the proxy (MITM)", proxied_https),
        ):
            results[label] = timed(fn, n)
            row(label, results[label])
        for kind in ("HTTP", "HTTPS"):
            d = results[f"{kind} direct"]
            p = next(v for k, v in results.items() if k.startswith(f"{kind} through"))
            print(
                f"  added by the proxy, {kind:<5}: p50 {pct(p, 50) - pct(d, 50):+.2f} ms, "
                f"p95 {pct(p, 95) - pct(d, 95):+.2f} ms"
            )
        egress.finish("bench")

        print(f"\nrun cost, fresh sandbox, no network vs egress (prepare + run + finish), {runs} each:")
        hello = {"python": "print(1)", "javascript": "console.log(1)"}
        for lang, code in hello.items():

            def plain_run(code: str = code, lang: str = lang) -> None:
                r = run_in_sandbox(engine, "none", code, lang, uid=random.randrange(150_000, 199_999))
                assert r.exit_code == 0, r.stderr

            def egress_run(code: str = code, lang: str = lang) -> None:
                run_id = uuid.uuid4().hex[:12]
                g = egress.prepare(run_id, policy)
                r = run_in_sandbox(
                    engine, g.network, code, lang, env=g.env, files=g.files, uid=random.randrange(150_000, 199_999)
                )
                egress.finish(run_id)
                assert r.exit_code == 0, r.stderr

            a, b = timed(plain_run, runs), timed(egress_run, runs)
            row(f"{lang} network=none", a)
            row(f"{lang} egress", b)
            print(
                f"  extra for egress, {lang}: p50 {pct(b, 50) - pct(a, 50):+.1f} ms "
                f"(mean {statistics.mean(b) - statistics.mean(a):+.1f} ms)"
            )

        fetch = (
            f"const t=Date.now(); fetch('http://{PLAIN_HOST}/').then(r=>r.text()).then(()=>console.log(Date.now()-t))"
        )
        urllib_code = (
            "import time,urllib.request as u; t=time.perf_counter(); "
            f"u.urlopen('http://{PLAIN_HOST}/').read(); print((time.perf_counter()-t)*1000)"
        )
        print("\nfirst request from inside a sandbox (includes loading the client):")
        for lang, code in (("javascript", fetch), ("python", urllib_code)):
            xs = []
            for _ in range(min(runs, 10)):
                run_id = uuid.uuid4().hex[:12]
                g = egress.prepare(run_id, policy)
                r = run_in_sandbox(
                    engine, g.network, code, lang, env=g.env, files=g.files, uid=random.randrange(150_000, 199_999)
                )
                egress.finish(run_id)
                xs.append(float(r.stdout.strip()))
            row(f"{lang} first request", xs)
    finally:
        egress.close()
        plain.close()
        secure.close()
        engine.close()


def pooled(n: int) -> None:
    """Pooled print(1): no network vs egress, each run paced so that it is a pool hit."""
    from execbox import Executor
    from execbox.pool import Profile
    from execbox.runtimes import get_runtime

    plain = start_upstream()
    ex = Executor(pool=True, pool_min_ready=1, proxy_host_map={PLAIN_HOST: f"127.0.0.1:{plain.port}"})
    policy = {"mode": "proxy", "allow": [PLAIN_HOST]}
    try:
        ex.execute("print(0)", language="python", network=policy)  # starts egress and its pooled sandboxes
        print(f"pooled python print(1), paced (a ready sandbox before each run), {n} each:")
        results = {}
        for label, network in (("network=none", None), ("egress", ex.egress.network)):
            profile = Profile.of(get_runtime("python"), ex.image, ex.config.default_limits, network or "none")
            xs = []
            for _ in range(n + 1):
                deadline = time.monotonic() + 30
                while ex.pool.ready_count(profile) < 1 and time.monotonic() < deadline:  # type: ignore[union-attr]
                    time.sleep(0.005)
                time.sleep(0.05)  # let the refiller's container creation settle (it competes for the CPU)
                t = time.perf_counter()
                r = ex.execute("print(1)", language="python", network=policy if network else None)
                xs.append((time.perf_counter() - t) * 1000)
                assert r.stdout == "1\n", r.stderr
            results[label] = xs[1:]
            row(f"python {label} (pooled)", results[label])
        a, b = pct(results["network=none"], 50), pct(results["egress"], 50)
        stats = ex.pool_stats()
        print(f"  egress / none, p50: {b / a:.2f}x   (pool hits {stats.hits}, misses {stats.misses})\n")  # type: ignore[union-attr]
    finally:
        ex.close()
        plain.close()


if __name__ == "__main__":
    main()
