"""The egress proxy: mitmproxy as a library, on its own event loop in a background thread.

Only the mitmproxy addons execbox needs are loaded (core, proxy server, layer
detection, TLS), followed by execbox's own addons in a fixed order. mitmproxy
keeps process-wide state (``mitmproxy.ctx``), so one proxy runs per process.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path
from typing import Any

from ..exceptions import ConfigurationError
from . import _mitm
from .addons import auth, gate, hooks, netlog, policy, redaction, secrets, upstream
from .addons._common import ClientRuns
from .addresses import Resolver, system_resolver
from .ca import CA_BASENAME
from .hooks import EgressHook
from .runs import RunRegistry

__all__ = ["EgressProxy"]

log = logging.getLogger("execbox.egress.proxy")
_ONE_PER_PROCESS = threading.Lock()


class _Ready:
    """Reports the bound port (or the failure to bind) once mitmproxy runs."""

    def __init__(self, proxy: EgressProxy, server: Any, master: Any, event: threading.Event) -> None:
        self.proxy, self.server, self.master, self.event = proxy, server, master, event

    def running(self) -> None:
        addrs = self.server.listen_addrs()
        if addrs:
            self.proxy.port = int(addrs[0][1])
        else:
            self.proxy._error = RuntimeError("no listening socket (address in use, or not an address of this host)")
            self.master.shutdown()
        self.event.set()


class EgressProxy:
    """Start/stop the proxy; the registry decides which runs it serves."""

    def __init__(
        self,
        registry: RunRegistry,
        *,
        listen_host: str,
        listen_port: int,
        ca_dir: Path,
        host_map: dict[str, str],
        hooks_: list[EgressHook],
        upstream_ca_file: Path | None = None,
        max_body_bytes: int = 32 << 20,
        resolver: Resolver | None = None,
    ) -> None:
        self.registry = registry
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.ca_dir = ca_dir
        self.host_map = dict(host_map)
        self.hooks = list(hooks_)
        self.upstream_ca_file = upstream_ca_file
        self.max_body_bytes = max_body_bytes
        self.resolver = resolver or system_resolver()
        self.port: int | None = None
        self._thread: threading.Thread | None = None
        self._master: Any = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._error: BaseException | None = None
        self._holding = False

    def addons(self) -> list[Any]:
        clients = ClientRuns()
        return [
            auth.RunCredentials(self.registry, clients),
            policy.PolicyCheck(),
            upstream.UpstreamGuard(clients, self.host_map, self.resolver),
            secrets.SecretSubstitution(),
            hooks.OperatorHooks(self.hooks),
            redaction.ResponseHeaderFilter(),
            netlog.NetworkLog(),
            gate.FailClosedGate(clients),
        ]

    def start(self, timeout: float = 20.0) -> int:
        """Start listening; return the port. Raises ConfigurationError if it cannot."""
        if not _ONE_PER_PROCESS.acquire(blocking=False):
            raise ConfigurationError("an egress proxy is already running in this process")
        self._holding = True
        ready = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(ready,), name="execbox-egress-proxy", daemon=True)
        self._thread.start()
        while not ready.wait(0.05):
            if not self._thread.is_alive() or timeout <= 0:
                break
            timeout -= 0.05
        if not ready.is_set() or self.port is None:
            self.stop()
            raise ConfigurationError(f"the egress proxy did not start on {self.listen_host}: {self._error}")
        log.info("egress proxy listening on %s:%d", self.listen_host, self.port)
        return self.port

    def _main(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve(ready))
        except BaseException as exc:  # reported to start()
            self._error = exc
            log.exception("egress proxy stopped with an error")
        finally:
            loop.close()

    async def _serve(self, ready: threading.Event) -> None:
        opts: Any = _mitm.options.Options()
        master: Any = _mitm.Master(opts, event_loop=asyncio.get_running_loop())
        proxyserver: Any = _mitm.proxyserver
        server: Any = proxyserver.Proxyserver()
        master.addons.add(
            _mitm.core.Core(),
            server,
            _mitm.next_layer.NextLayer(),
            _mitm.tlsconfig.TlsConfig(),
            _mitm.disable_h2c.DisableH2C(),
        )
        master.addons.add(*self.addons())
        master.addons.add(_Ready(self, server, master, ready))
        opts.update(
            mode=["regular"],
            listen_host=self.listen_host,
            listen_port=self.listen_port,
            confdir=str(self.ca_dir),
            connection_strategy="lazy",
            upstream_cert=False,
            rawtcp=True,  # what is neither TLS nor HTTP becomes a TCP flow, which the gate ends
            http3=False,
            ssl_insecure=False,
            ssl_verify_upstream_trusted_ca=str(self.upstream_ca_file) if self.upstream_ca_file else None,
            body_size_limit=str(self.max_body_bytes),
            stream_large_bodies=None,
        )
        assert CA_BASENAME == "mitmproxy"  # mitmproxy reads <confdir>/mitmproxy-ca.pem
        self._master = master
        try:
            await master.run()
        finally:
            # mitmproxy does not close its listening sockets on shutdown: do it here,
            # so that a stopped proxy leaves no socket behind.
            await server.servers.update([])

    def stop(self) -> None:
        """Stop the proxy and wait for its thread."""
        master, thread = self._master, self._thread
        if master is not None:
            try:
                master.shutdown()
            except RuntimeError:  # loop already closed
                pass
        if thread is not None:
            thread.join(10)
        self._master = self._thread = None
        if self._holding:
            self._holding = False
            _ONE_PER_PROCESS.release()
