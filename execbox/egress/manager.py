"""``Egress``: the seam the executor uses. One per executor/service; starts everything lazily."""

from __future__ import annotations

import logging
import secrets as _secrets
import threading
from importlib import resources
from typing import Any

from ..engine.base import Engine
from ..exceptions import ConfigurationError, InvalidRequestError
from ..runtimes import WORKDIR
from .hooks import EgressHook, load_hooks
from .models import BoundSecretData, EgressBinding, EgressGrant, EgressSettings, NetworkLogEntry, Secret
from .policy import NetworkPolicy
from .runs import BoundSecret, RunRegistry, RunState

__all__ = ["CA_FILE", "Egress", "NODE_PRELOAD", "PYTHON_DIR"]

log = logging.getLogger("execbox.egress")

CA_FILE = ".execbox/egress-ca.pem"
NODE_PRELOAD = ".execbox/egress-node.js"
PYTHON_DIR = ".execbox/python"


def _preload(name: str) -> str:
    return (resources.files("execbox.egress") / "preload" / name).read_text()


class Egress:
    """The egress subsystem: proxy, internal network, firewall, CA; per-run grants and logs.

    >>> egress = Egress(engine, EgressSettings(host_map={"api.example.test": "127.0.0.1:8081"}))
    >>> grant = egress.prepare(run_id, NetworkPolicy(mode="proxy", allow=["api.example.test"]), {})
    >>> # create the sandbox on grant.network, add grant.env and grant.files to the agent request
    >>> log = egress.finish(run_id)
    >>> egress.close()
    """

    def __init__(self, engine: Engine, settings: EgressSettings | None = None) -> None:
        self.engine = engine
        self.settings = settings or EgressSettings()
        self.registry = RunRegistry()
        self.hooks: list[EgressHook] = load_hooks(self.settings.hooks, self.settings.hook_entry_points)
        self._lock = threading.Lock()
        self._started = False
        self._closed = False
        self._network: Any = None
        self._firewall: Any = None
        self._proxy: Any = None
        self.ca_pem = ""
        self.network = ""
        self.gateway = ""
        self.port = 0
        self._files: dict[str, str] = {}

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Create the CA, the network, the proxy and the firewall rules (once; thread-safe)."""
        with self._lock:
            if self._closed:
                raise InvalidRequestError("network", "egress is closed")
            if self._started:
                return
            try:
                self._start()
            except BaseException:
                # A named network may be another process's (its proxy holds the port): leave it be.
                self._teardown(keep_network=self.settings.network_name is not None)
                raise
            self._started = True

    def _start(self) -> None:
        from .ca import ensure_ca
        from .network import EgressNetwork, Firewall, sweep_stale_chains
        from .proxy import EgressProxy

        s = self.settings
        self.ca_pem = ensure_ca(s.ca_dir)
        if s.firewall == "iptables":
            stale = sweep_stale_chains()
            if stale:
                log.info("removed stale egress firewall chains: %s", ", ".join(stale))
        self._network = EgressNetwork(self.engine, s.network_name)
        info = self._network.ensure()
        self._proxy = EgressProxy(
            self.registry,
            listen_host=info.gateway,
            listen_port=s.proxy_port,
            ca_dir=s.ca_dir,
            host_map=s.host_map,
            hooks_=self.hooks,
            upstream_ca_file=s.upstream_ca_file,
            max_body_bytes=s.max_body_bytes,
        )
        self.port = self._proxy.start(s.startup_timeout)
        if s.firewall == "iptables":
            self._firewall = Firewall(info.bridge, info.gateway, self.port)
            self._firewall.install()
        self.network, self.gateway = info.name, info.gateway
        self._files = {
            CA_FILE: self.ca_pem,
            NODE_PRELOAD: _preload("node.js"),
            f"{PYTHON_DIR}/sitecustomize.py": _preload("sitecustomize.py"),
        }
        log.info("egress ready: network %s, proxy %s:%d", info.name, info.gateway, self.port)

    def _teardown(self, keep_network: bool = False) -> None:
        if self._proxy is not None:
            self._proxy.stop()
            self._proxy = None
        # A network that sandboxes are still on (live sessions, adopted by the next process)
        # stays, and so do its firewall rules: without them its sandboxes would reach the host.
        kept = self._network is not None and (keep_network or not self._network.remove())
        self._network = None
        if self._firewall is not None and not kept:
            self._firewall.remove()
        self._firewall = None

    def close(self) -> None:
        """Stop the proxy, remove the firewall rules and the network."""
        with self._lock:
            self._closed = True
            self._teardown()
            self._started = False

    def __enter__(self) -> Egress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- runs --------------------------------------------------------------------------

    def prepare(
        self,
        run_id: str,
        policy: NetworkPolicy,
        secrets: dict[str, Secret] | None = None,
        *,
        ceiling: NetworkPolicy | None = None,
        tenant: str | None = None,
        user_id: str | None = None,
    ) -> EgressGrant:
        """Register a run with the proxy; return what its sandbox needs.

        ``ceiling`` (a tenant's policy) caps ``policy``: a request must be allowed by both.
        """
        if policy.mode != "proxy":
            raise InvalidRequestError("network.mode", "prepare() is only for runs with mode 'proxy'")
        secrets = secrets or {}
        for name in secrets:
            if not name.isidentifier() or not name.isascii():
                raise InvalidRequestError(f"secrets.{name}", "a secret name is an environment variable name")
        self.start()
        username, password = self.registry.new_credential(run_id)
        bound = tuple(
            BoundSecret(name, f"execbox-secret-{_secrets.token_hex(16)}", s.value.get_secret_value(), s.hosts)
            for name, s in secrets.items()
        )
        policies = (ceiling, policy) if ceiling is not None else (policy,)
        state = RunState(
            run_id=run_id,
            username=username,
            password=password,
            policies=policies,
            secrets=bound,
            tenant=tenant,
            user_id=user_id,
            max_log=self.settings.max_log_entries,
        )
        self.registry.add(state)
        return self._grant(state)

    def binding(self, run_id: str) -> EgressBinding:
        """What ``restore`` needs to serve this run again in another process (it holds the
        secrets' real values and the run's proxy credential: store it privately)."""
        state = self.registry.get(run_id)
        if state is None:
            raise KeyError(run_id)
        return EgressBinding(
            run_id=run_id,
            network=self.network,
            proxy=f"{self.gateway}:{self.port}",
            username=state.username,
            password=state.password,
            policies=state.policies,
            secrets=tuple(
                BoundSecretData(name=b.name, placeholder=b.placeholder, value=b.value, hosts=b.hosts)
                for b in state.secrets
            ),
            tenant=state.tenant,
            user_id=state.user_id,
        )

    def restore(self, binding: EgressBinding) -> None:
        """Serve a run prepared by another process (its sandbox lives on) under its old credential.

        Raises ConfigurationError if this proxy is not where the sandbox was told it is (another
        network name or port): its environment cannot change, so its grant cannot be restored.
        """
        self.start()
        here = f"{self.gateway}:{self.port}"
        if (binding.network, binding.proxy) != (self.network, here):
            raise ConfigurationError(
                f"its sandbox uses the egress proxy at {binding.proxy} on network {binding.network};"
                f" this one is at {here} on {self.network} (give EgressSettings a stable network_name and proxy_port)"
            )
        current = self.registry.get(binding.run_id)
        if current is not None and (current.username, current.password) == (binding.username, binding.password):
            return  # already served here
        if current is not None:
            self.registry.pop(binding.run_id)
        self.registry.add(
            RunState(
                run_id=binding.run_id,
                username=binding.username,
                password=binding.password,
                policies=binding.policies,
                secrets=tuple(BoundSecret(b.name, b.placeholder, b.value, b.hosts) for b in binding.secrets),
                tenant=binding.tenant,
                user_id=binding.user_id,
                max_log=self.settings.max_log_entries,
            )
        )

    def serves(self, run_id: str) -> bool:
        """Is the run registered with this process's proxy?"""
        return self.registry.get(run_id) is not None

    def _grant(self, state: RunState) -> EgressGrant:
        run_id, username, password, bound = state.run_id, state.username, state.password, state.secrets
        proxy = f"http://{username}:{password}@{self.gateway}:{self.port}"
        ca = f"{WORKDIR}/{CA_FILE}"
        env = {
            "HTTP_PROXY": proxy,
            "HTTPS_PROXY": proxy,
            "http_proxy": proxy,
            "https_proxy": proxy,
            "NO_PROXY": "localhost,127.0.0.1,::1",
            "no_proxy": "localhost,127.0.0.1,::1",
            "SSL_CERT_FILE": ca,
            "REQUESTS_CA_BUNDLE": ca,
            "CURL_CA_BUNDLE": ca,
            "NODE_EXTRA_CA_CERTS": ca,
            "NODE_OPTIONS": f"--require {WORKDIR}/{NODE_PRELOAD}",
            "PYTHONPATH": f"{WORKDIR}/{PYTHON_DIR}",
            **{s.name: s.placeholder for s in bound},
        }
        return EgressGrant(
            run_id=run_id,
            network=self.network,
            env=env,
            files=dict(self._files),
            proxy_url=f"http://{self.gateway}:{self.port}",
            preloads={"python": f"{WORKDIR}/{PYTHON_DIR}", "javascript": f"{WORKDIR}/{NODE_PRELOAD}"},
        )

    def log(self, run_id: str) -> list[NetworkLogEntry]:
        """The run's network log so far."""
        state = self.registry.get(run_id)
        return state.entries() if state is not None else []

    def take_log(self, run_id: str) -> list[NetworkLogEntry]:
        """The run's network log since the last take (or since it began), which starts afresh:
        a session takes it after each call, so that each call sees its own entries."""
        state = self.registry.get(run_id)
        if state is None:
            return []
        entries, dropped = state.take()
        if dropped:
            log.warning("run %s: %d network log entries over the cap were dropped", run_id, dropped)
        return entries

    def finish(self, run_id: str) -> list[NetworkLogEntry]:
        """Forget the run (its credential stops working) and return its network log."""
        state = self.registry.pop(run_id)
        if state is None:
            return []
        if state.dropped:
            log.warning("run %s: %d network log entries over the cap were dropped", run_id, state.dropped)
        return state.entries()


class LazyEgress:
    """An ``Egress`` given by the caller (shared), or one made from settings on first use (owned:
    closed by ``close``). What ``Executor`` and ``Sessions`` hold."""

    def __init__(self, engine: Engine, egress: Egress | EgressSettings | None, host_map: dict[str, str] | None) -> None:
        self.engine = engine
        self._egress = egress if isinstance(egress, Egress) else None
        self.owned = self._egress is None
        self.settings = egress if isinstance(egress, EgressSettings) else EgressSettings()
        if host_map:
            self.settings = self.settings.model_copy(update={"host_map": host_map})
        self._lock = threading.Lock()

    def get(self) -> Egress:
        with self._lock:
            if self._egress is None:
                self._egress = Egress(self.engine, self.settings)
            return self._egress

    @property
    def made(self) -> Egress | None:
        """The Egress if there is one yet (None: nothing used egress)."""
        return self._egress

    def close(self) -> None:
        if self.owned and self._egress is not None:
            self._egress.close()
