"""Egress runs from the warm pool: sandboxes ready on the egress network, the grant sent with the request.

A real proxy, real sandboxes, upstreams of the test's own on loopback (HTTP and HTTPS),
mapped to test hostnames.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from execbox import Executor
from execbox.egress import EgressSettings
from execbox.engine.base import Engine
from execbox.pool import Profile
from execbox.runtimes import get_runtime
from tests.conftest import ours
from tests.support import eventually

from .egress_support import OTHER_HOST, PLAIN_HOST, SECURE_HOST, Upstream, self_signed, start_upstream

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Upstream, Upstream, Path]]:
    tmp = tmp_path_factory.mktemp("egress-pool")
    cert, tls = self_signed(tmp)
    plain, secure = start_upstream(), start_upstream(tls=tls)
    yield plain, secure, cert
    plain.close()
    secure.close()


@pytest.fixture(scope="module")
def pex(engine: Engine, upstreams: tuple[Upstream, Upstream, Path]) -> Iterator[Executor]:
    plain, secure, cert = upstreams
    settings = EgressSettings(
        host_map={
            PLAIN_HOST: f"127.0.0.1:{plain.port}",
            OTHER_HOST: f"127.0.0.1:{plain.port}",
            SECURE_HOST: f"127.0.0.1:{secure.port}",
        },
        upstream_ca_file=cert,
    )
    ex = Executor(engine=engine, egress=settings, pool=True, pool_min_ready=1, pool_max_total=6)
    yield ex
    ex.close()
    assert ours(engine) == []


def _egress_profile(ex: Executor, language: str) -> Profile:
    return Profile.of(get_runtime(language), ex.image, ex.config.default_limits, ex.egress.network)


def _pooled(ex: Executor, language: str, code: str, allow: list[str]) -> tuple[object, int]:
    """Run ``code`` once a ready egress sandbox waits; the result and how many pool hits it made."""
    eventually(lambda: ex.pool.ready_count(_egress_profile(ex, language)) >= 1)  # type: ignore[union-attr]
    hits = ex.pool_stats().hits  # type: ignore[union-attr]
    r = ex.execute(code, language=language, network={"mode": "proxy", "allow": allow}, timeout=20)
    return r, ex.pool_stats().hits - hits  # type: ignore[union-attr]


PY = r"""
import json, urllib.request, urllib.error
out = {}
for name, url in (("http", "http://plain.example.test/p"), ("https", "https://secure.example.test/s"),
                  ("denied", "http://other.example.test/o")):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            out[name] = [r.status, json.loads(r.read())["path"]]
    except urllib.error.HTTPError as e:
        out[name] = [e.code, e.headers.get("x-execbox-rule")]
print(json.dumps(out))
"""

JS = r"""
(async () => {
  const out = {};
  for (const [name, url] of [['https', 'https://secure.example.test/js'], ['http', 'http://plain.example.test/js']]) {
    const r = await fetch(url);
    out[name] = [r.status, (await r.json()).path];
  }
  require('https').get('https://other.example.test/x', () => {}).on('error', (e) => {
    out.denied = e.code;
    console.log(JSON.stringify(out));
  });
})();
"""


def test_egress_runs_use_ready_sandboxes_python(pex: Executor) -> None:
    pex.execute("print(0)", language="python", network={"mode": "proxy", "allow": [PLAIN_HOST]})  # starts egress
    r, hits = _pooled(pex, "python", PY, [PLAIN_HOST, SECURE_HOST])
    assert hits == 1 and r.exit_code == 0, r.stderr  # type: ignore[attr-defined]
    assert json.loads(r.stdout) == {  # type: ignore[attr-defined]
        "http": [200, "/p"],
        "https": [200, "/s"],  # the proxy's CA, trusted by a runtime started before the run
        "denied": [403, "default-deny"],
    }


def test_egress_runs_use_ready_sandboxes_node(pex: Executor) -> None:
    pex.execute("1", network={"mode": "proxy", "allow": [PLAIN_HOST]})
    r, hits = _pooled(pex, "javascript", JS, [PLAIN_HOST, SECURE_HOST])
    assert hits == 1 and r.exit_code == 0, r.stderr  # type: ignore[attr-defined]
    assert json.loads(r.stdout) == {"https": [200, "/js"], "http": [200, "/js"], "denied": "EEGRESS"}  # type: ignore[attr-defined]


def test_consecutive_pooled_runs_keep_their_own_policy(pex: Executor) -> None:
    code = (
        "import urllib.request, urllib.error\n"
        "for h in ('plain', 'other'):\n"
        "    try:\n"
        "        print(h, urllib.request.urlopen(f'http://{h}.example.test/', timeout=10).status)\n"
        "    except urllib.error.HTTPError as e:\n"
        "        print(h, e.code)\n"
    )
    pex.execute("print(0)", language="python", network={"mode": "proxy", "allow": [PLAIN_HOST]})
    seen = []
    for allow in ([PLAIN_HOST], [OTHER_HOST], [PLAIN_HOST, OTHER_HOST], []):
        r, hits = _pooled(pex, "python", code, allow)
        assert hits == 1, "not from the pool"
        seen.append(r.stdout)  # type: ignore[attr-defined]
    assert seen == [
        "plain 200\nother 403\n",
        "plain 403\nother 200\n",
        "plain 200\nother 200\n",
        "plain 403\nother 403\n",
    ]


def test_a_pooled_egress_sandbox_holds_no_grant_before_its_run(pex: Executor) -> None:
    pex.execute("print(0)", language="python", network={"mode": "proxy", "allow": [PLAIN_HOST]})
    eventually(lambda: pex.pool.ready_count(_egress_profile(pex, "python")) >= 1)  # type: ignore[union-attr]
    ready = [sb for sb in pex.factory.live() if not sb.leased and sb.profile.network != "none"]
    assert ready
    for sb in ready:
        info = pex.engine.api.inspect_container(sb.id)  # type: ignore[attr-defined]
        env = "\n".join(info["Config"]["Env"] or [])
        assert "PROXY" not in env and "execbox-secret" not in env and "run-" not in env
