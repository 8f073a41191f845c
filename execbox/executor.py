"""Ephemeral executions: one new container per run, removed afterwards whatever happens."""

from __future__ import annotations

import base64
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pydantic

from .agentlink import AgentError, CallOutput, LinkEnded, Outcome
from .config import ExecutorConfig
from .egress import Egress, EgressGrant, EgressSettings, NetworkPolicy
from .egress.manager import LazyEgress
from .engine import open_engine
from .engine.base import Engine, Isolation, SandboxState
from .exceptions import ImageNotFoundError, InvalidRequestError, SandboxError
from .hardening import WORKDIR
from .images import default_image
from .models import ExecutionRequest, ExecutionResult, Limits, invalid_request, resolve_limits
from .pool import Pool, PoolStats, Profile, Sandbox, SandboxFactory
from .reaper import sweep
from .runtimes import Runtime, get_runtime
from .state import StateStore, check_id, extract_state, state_env
from .uids import UidRegistry, host_store
from .volumes import UID_BASE as VOLUME_UID_BASE
from .volumes import UID_COUNT as VOLUME_UID_COUNT
from .volumes import VolumeManager

__all__ = ["Executor", "OutputCallback"]

log = logging.getLogger("execbox.executor")

# Seconds a run's agent stays after its answer unless let go: the engine's work on the
# container's end then comes after the caller has the result (p50 of a pooled run through
# the API: 5.8 -> 4.3 ms over 150 calls alternating between two servers, README); a
# retired sandbox is removed after it.
LINGER = 0.05

OutputCallback = Callable[[str, bytes], None]
"""Called with ("stdout" | "stderr", chunk) as output arrives (within the caps)."""


class Executor:
    """Runs code in fresh, hardened, single-use containers.

    >>> with Executor() as ex:
    ...     r = ex.execute('console.log(process.env.KEY)', env={"KEY": "v"})
    """

    def __init__(
        self,
        engine: Engine | str | None = None,
        config: ExecutorConfig | None = None,
        *,
        state_store: StateStore | None = None,
        egress: Egress | EgressSettings | None = None,
        proxy_host_map: dict[str, str] | None = None,
        uid_store: StateStore | None = None,
        **options: Any,
    ) -> None:
        """``uid_store`` holds the leases of sandbox UIDs (default: this host's lease
        table under ``data_dir``, shared by every execbox process using it)."""
        if config is None:
            try:
                config = ExecutorConfig(**options)
            except pydantic.ValidationError as exc:
                raise invalid_request(exc) from None
        elif options:
            config = config.model_copy(update=options)
        if engine is None or isinstance(engine, str):
            engine = open_engine(engine)
        self.engine = engine
        self.config = config
        self.image = default_image()
        if config.image:  # a package image's name ("data") becomes its tag, once
            self.image = self.resolve_image(config.image)
        self.state_store = state_store
        self.node_name = config.node_name or socket.gethostname()
        # Egress starts (proxy, network, firewall) on the first run that asks for it.
        self._egress = LazyEgress(engine, egress, proxy_host_map)
        self._warm: set[tuple[Isolation, str]] = set()  # (isolation, network) kept warm in the pool
        self._volumes_lock = threading.Lock()
        self._volumes: VolumeManager | None = None
        self._closed = False
        if config.sweep_on_start:
            sweep(engine)
        ttl = config.max_limits.timeout + config.pool_max_idle_age + 600
        self._owns_uid_store = uid_store is None
        self.uid_store = uid_store if uid_store is not None else host_store(config.data_dir)
        self.factory = SandboxFactory(engine, UidRegistry(self.uid_store, config.uid_base, config.uid_count), ttl)
        self.pool: Pool | None = None
        if config.pool:
            self.pool = Pool(
                self.factory,
                max_total=config.pool_max_total,
                max_idle_age=config.pool_max_idle_age,
                refill_concurrency=config.pool_refill_concurrency,
            )
            self._keep_warm(config.isolation, "none")

    # -- public API -------------------------------------------------------------------

    def execute(
        self,
        code: str,
        env: dict[str, str] | None = None,
        *,
        language: str = "javascript",
        on_output: OutputCallback | None = None,
        tenant: str = "default",
        **fields: Any,
    ) -> ExecutionResult:
        """Run ``code`` once in a new container and return what it produced.

        ``fields`` are those of ``ExecutionRequest``: stdin, files, timeout, limits,
        image, state, user_id, persist_state, ...
        """
        files = fields.get("files")
        if isinstance(files, dict):  # text is welcome here (the model itself takes bytes or base64)
            fields["files"] = {p: c.encode() if isinstance(c, str) else c for p, c in files.items()}
        try:
            request = ExecutionRequest.model_validate({"code": code, "language": language, "env": env or {}, **fields})
        except pydantic.ValidationError as exc:
            raise invalid_request(exc) from None
        return self.run(request, on_output=on_output, tenant=tenant)

    def run(
        self,
        request: ExecutionRequest,
        on_output: OutputCallback | None = None,
        *,
        tenant: str = "default",
        network_ceiling: NetworkPolicy | None = None,
    ) -> ExecutionResult:
        """Run a validated request (see ``execute``).

        ``tenant`` namespaces stored state and volumes; ``network_ceiling`` (a tenant's
        policy) caps the request's own egress policy: a request must be allowed by both.
        """
        if self._closed:
            raise InvalidRequestError("executor", "this executor is closed")
        check_id("tenant", tenant)
        runtime = get_runtime(request.language)
        limits = self.resolve_limits(request)
        if len(request.code.encode()) > self.config.max_code_bytes:
            raise InvalidRequestError("code", f"larger than {self.config.max_code_bytes} bytes")
        store = self.state_store
        user = request.user_id
        persist = request.persist_state
        if persist and user is None:
            raise InvalidRequestError("user_id", "required with persist_state")
        if persist and store is None:
            raise InvalidRequestError("persist_state", "this executor has no state store")
        if request.volume and user is None:
            raise InvalidRequestError("user_id", "required with volume")
        image = self.resolve_image(request.image)
        if request.state is not None:  # refuse bad state before any container exists
            state_env(request.state, self.config.max_state_bytes)
        proxied = request.network is not None and request.network.mode == "proxy"
        if request.secrets and not proxied:
            raise InvalidRequestError("secrets", "secrets need network mode 'proxy' (nothing else could use them)")
        for name in request.secrets:
            if name in request.env:
                raise InvalidRequestError(f"secrets.{name}", "also given in env: a name is either a secret or not")
        if not persist:
            return self._run_once(request, runtime, limits, image, request.state, on_output, tenant, network_ceiling)
        assert store is not None and user is not None
        # One stateful run per user at a time (the lock lives in the store, so it
        # holds across replicas; its lease bounds a crashed holder).
        with store.lock(tenant, user, lease=limits.timeout + 60, wait=limits.timeout + 60):
            state_in = request.state
            if state_in is None:
                stored = store.get(tenant, user)
                state_in = stored.value if stored is not None else None
            result = self._run_once(request, runtime, limits, image, state_in, on_output, tenant, network_ceiling)
            ok = result.exit_code == 0 and not result.timed_out and result.state_error is None
            if ok and result.state is not None:
                try:
                    store.put(tenant, user, result.state)
                    result.state_saved = True
                except InvalidRequestError as exc:
                    result.state_error = exc.message
        return result

    def _run_once(
        self,
        request: ExecutionRequest,
        runtime: Runtime,
        limits: Limits,
        image: str,
        state: Any,
        on_output: OutputCallback | None,
        tenant: str,
        network_ceiling: NetworkPolicy | None = None,
    ) -> ExecutionResult:
        exec_id = uuid.uuid4().hex[:16]
        grant = None
        isolation = request.isolation or self.config.isolation
        if request.network is not None and request.network.mode == "proxy":
            self._keep_egress_ready(isolation)
            grant = self.egress.prepare(
                exec_id,
                request.network,
                request.secrets,
                ceiling=network_ceiling,
                tenant=tenant,
                user_id=request.user_id,
            )
        try:
            if grant is None:
                self._keep_warm(isolation, "none")
            return self._run_sandbox(exec_id, request, runtime, limits, image, state, on_output, grant, tenant)
        finally:
            if grant is not None:
                self.egress.finish(exec_id)

    def _keep_egress_ready(self, isolation: Isolation) -> None:
        """Once egress runs happen, keep warm sandboxes on its network too (the grant comes
        with each request: the sandboxes hold nothing of any run)."""
        if self.pool is None or not self.config.pool_egress:
            return
        self.egress.start()
        self._keep_warm(isolation, self.egress.network)

    def _keep_warm(self, isolation: Isolation, network: str) -> None:
        """Keep the pooled languages ready under ``isolation`` on ``network`` (from now on)."""
        if self.pool is None or (isolation, network) in self._warm:
            return
        self._warm.add((isolation, network))
        for language in self.config.pool_languages:
            profile = Profile.of(
                get_runtime(language), self.image, self.config.default_limits, network, isolation=isolation
            )
            self.pool.keep_ready(profile, self.config.pool_min_ready)

    def _run_sandbox(
        self,
        exec_id: str,
        request: ExecutionRequest,
        runtime: Runtime,
        limits: Limits,
        image: str,
        state: Any,
        on_output: OutputCallback | None,
        grant: EgressGrant | None,
        tenant: str,
    ) -> ExecutionResult:
        user_env = {**request.env, **(grant.env if grant is not None else {})}
        env = runtime.environment(user_env)
        if state is not None:
            env.update(state_env(state, self.config.max_state_bytes))
        files = dict(request.files)
        if grant is not None:
            files.update({p: text.encode() for p, text in grant.files.items()})
        payload = {
            "argv": list(runtime.argv),
            "filename": runtime.filename,
            "code": request.code,
            "env": env,
            "stdin": base64.b64encode(request.stdin.encode()).decode() if request.stdin else None,
            "files": {p: base64.b64encode(data).decode() for p, data in files.items()},
            "collect": request.collect,
            "workdir": WORKDIR,
            "timeout": limits.timeout,
            "output_bytes": limits.output_bytes,
            # The grant's start-up variables (NODE_OPTIONS, PYTHONPATH, NODE_EXTRA_CA_CERTS) are
            # covered by its preload, which a warm runtime loads itself: only the caller's count.
            "warm": runtime.warm_ok(request.env),
            "preload": grant.preloads.get(runtime.name) if grant is not None else None,
            "linger": LINGER,
        }
        volume = self.volumes.ensure(tenant, request.user_id) if request.volume and request.user_id else None
        profile = Profile.of(
            runtime,
            image,
            limits,
            grant.network if grant is not None else "none",
            volume=volume.name if volume else None,
            uid=volume.uid if volume else None,
            isolation=request.isolation or self.config.isolation,
        )
        if volume is None:
            result = self._run_in(profile, payload, exec_id, limits, on_output)
        else:
            # The run holds its volume (backups and restores wait) until its sandbox is gone.
            with self.volumes.in_use(volume):
                result = self._run_in(profile, payload, exec_id, limits, on_output, keep_off_pool=True)
        result.language = runtime.name
        result.isolation = profile.isolation
        result.node = self.node_name
        result.stdout, result.state, result.state_error, _ = extract_state(result.stdout)
        if grant is not None:
            result.network_log = self.egress.log(exec_id)
        log.info(
            "execution %s finished",
            exec_id,
            extra={
                "execution_id": exec_id,
                "language": runtime.name,
                "isolation": profile.isolation,
                "exit_code": result.exit_code,
                "timed_out": result.timed_out,
                "oom_killed": result.oom_killed,
                "duration_ms": result.duration_ms,
            },
        )
        return result

    def _run_in(
        self,
        profile: Profile,
        payload: dict[str, Any],
        exec_id: str,
        limits: Limits,
        on_output: OutputCallback | None,
        keep_off_pool: bool = False,
    ) -> ExecutionResult:
        """Take a sandbox for ``profile``, run ``payload`` in it, remove it (in the background when pooled)."""
        started = time.monotonic()
        try:
            if self.pool is not None:
                sb, _ = self.pool.acquire(profile)
            else:
                sb = self.factory.make(profile)
        except ImageNotFoundError as exc:
            raise ImageNotFoundError(f"{exc} (build it with `execbox images build`)") from exc
        assert not sb.leased, "a sandbox is used once"
        sb.leased = True
        try:
            try:
                sb.link.send_json(payload)
            except LinkEnded as exc:
                raise SandboxError(f"execution {exec_id}: the sandbox ended before the request: {exc}") from None
            return self._collect(exec_id, sb, limits, on_output, started)
        finally:
            if self.pool is not None and not keep_off_pool:
                self.pool.retire(sb)  # off the request's path
            else:
                self.factory.destroy(sb, settle=1.0 if keep_off_pool else 0.0, let_go=True)

    def resolve_image(self, name: str | None) -> str:
        """The image tag a request's ``image`` names (the executor's default when unset).

        A package image's name (``"data"``, built from a spec by ``execbox images
        build``) becomes its current build's tag; an image reference stays as it is;
        an unknown name is an ``InvalidRequestError`` on ``image``, raised before any
        container exists.
        """
        from .images import resolve_image_name

        return resolve_image_name(self.engine, name or self.image)

    def resolve_limits(self, request: ExecutionRequest) -> Limits:
        """The request's limits over the defaults, checked against the maximum."""
        return resolve_limits(self.config.default_limits, self.config.max_limits, request.limits, request.timeout)

    @property
    def volumes(self) -> VolumeManager:
        """Per-user volumes (created on first use; needs root and a Docker engine)."""
        with self._volumes_lock:
            if self._volumes is None:
                from pathlib import Path

                self._volumes = VolumeManager(
                    self.engine,
                    Path(self.config.data_dir) / "volumes",
                    self.config.volume_quota,
                    uids=UidRegistry(self.uid_store, VOLUME_UID_BASE, VOLUME_UID_COUNT),
                    max_idle=self.config.volume_max_idle,
                )
            return self._volumes

    @property
    def egress(self) -> Egress:
        """The egress subsystem (created on first use; started by its first run)."""
        return self._egress.get()

    def housekeep(self) -> dict[str, int]:
        """One reaper pass: remove orphaned resources, and volumes idle past config.volume_max_idle."""
        removed = {"orphans": len(sweep(self.engine))}
        from pathlib import Path

        if (Path(self.config.data_dir) / "volumes" / "images").is_dir():
            removed["volumes"] = len(self.volumes.expire(self.config.volume_max_idle))
        return removed

    def pool_stats(self) -> PoolStats | None:
        return self.pool.stats() if self.pool is not None else None

    def drain(self, timeout: float = 60.0) -> bool:
        """Wait until every used sandbox has been removed (removal runs in the background)."""
        return self.pool.drain(timeout) if self.pool is not None else True

    def close(self) -> None:
        """Stop the pool and remove every container this executor still holds."""
        self._closed = True
        if self.pool is not None:
            self.pool.close()
        for sb in self.factory.live():
            self.factory.destroy(sb)
        self.factory.retry_removals()
        self._egress.close()
        if self._owns_uid_store and self.uid_store is not None:
            self.uid_store.close()

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    def _ended(self, sb: Sandbox) -> SandboxState:
        """How the sandbox ended (let go first: it may be lingering after its answer)."""
        sb.let_go()
        return self.engine.wait(sb.id, 2.0)

    def _collect(
        self,
        exec_id: str,
        sb: Sandbox,
        limits: Limits,
        on_output: OutputCallback | None,
        started: float,
    ) -> ExecutionResult:
        call = CallOutput(limits.output_bytes, on_output)
        deadline = time.monotonic() + limits.timeout + self.config.kill_grace
        try:
            meta = sb.link.read_call(deadline, call)
            outcome = Outcome.of(meta, oom=lambda: self._ended(sb).oom_killed)
        except TimeoutError:
            # The agent did not enforce the limit (wedged or subverted): the host does.
            self.engine.kill(sb.id)
            outcome = Outcome.killed_by_host()
        except LinkEnded:
            state = self._ended(sb)
            if not state.oom_killed:
                raise SandboxError(
                    f"execution {exec_id}: sandbox ended without a result (exit {state.exit_code})"
                    f" {sb.link.stderr_tail()}"
                ) from None
            outcome = Outcome.died(oom_killed=True)
        except AgentError as exc:
            raise SandboxError(f"execution {exec_id}: {exc}") from None
        except (SandboxError, ValueError) as exc:
            self.engine.kill(sb.id)
            raise SandboxError(f"execution {exec_id}: {exc}") from exc
        return ExecutionResult(id=exec_id, language="", sandbox_id=sb.id, **call.fields(outcome, started))
