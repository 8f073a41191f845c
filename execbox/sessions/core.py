"""``Sessions``: the public face (create, execute, get, list, stats, delete, reap, close)."""

from __future__ import annotations

import logging
import random
import secrets as _secrets
import threading
import time
from typing import Any

import pydantic

from ..egress import Egress, EgressSettings, NetworkPolicy, Secret
from ..engine import open_engine
from ..engine.base import Engine
from ..exceptions import InvalidRequestError, SessionNotFoundError
from ..images import default_image
from ..labels import owner_id
from ..models import Limits, check_isolation, invalid_request, resolve_limits
from ..runtimes import get_runtime
from ..state import StateStore, check_id
from ..uids import UidRegistry, host_store
from .calls import SessionsCalls
from .models import RECORD_KIND, REPL_ARGV, Record, SessionInfo, SessionsConfig
from .network import network_request
from .registry import default_store

__all__ = ["Sessions"]

log = logging.getLogger("execbox.sessions")


class Sessions(SessionsCalls):
    """Persistent per-user sessions over an engine and a registry in a ``StateStore``.

    Creating a ``Sessions`` reconciles the registry with the engine (adopting live
    sessions, removing unregistered session containers) and starts the reaper thread.
    ``close()`` stops the reaper; the sessions themselves live on for the next
    ``Sessions`` over the same store (``close(end_sessions=True)`` ends them). The
    store is closed with it if it was made here (no ``store``) or ``own_store`` says so.

    ``egress`` (an ``Egress`` to share, e.g. an ``Executor``'s, or ``EgressSettings``) and
    ``proxy_host_map`` are as for ``Executor``; sessions adopted after a restart keep their
    egress only if the proxy's ``network_name`` and ``proxy_port`` are the same as before.
    """

    def __init__(
        self,
        engine: Engine | str | None = None,
        store: StateStore | None = None,
        config: SessionsConfig | None = None,
        *,
        start_reaper: bool = True,
        own_store: bool = False,
        egress: Egress | EgressSettings | None = None,
        proxy_host_map: dict[str, str] | None = None,
        **options: Any,
    ) -> None:
        if config is None:
            try:
                config = SessionsConfig(**options)
            except pydantic.ValidationError as exc:
                raise invalid_request(exc, default="config") from None
        elif options:
            config = config.model_copy(update=options)
        if engine is None or isinstance(engine, str):
            engine = open_engine(engine)
        self.engine = engine
        self.store = store if store is not None else default_store()
        self._owns_store = own_store or store is None
        self.config = config
        self.image = config.image or default_image()
        self.registry_id = self._registry_id()
        self._links = {}
        self._lock = threading.Lock()
        self._rand = random.Random()
        self.uids = UidRegistry(host_store(config.data_dir), config.uid_base, config.uid_count)
        self._closed = False
        self._stop = threading.Event()
        self._counts = {"created": 0, "ended": 0}  # by this object, since it was made
        self._init_egress(egress, proxy_host_map)
        # Adopt what lives, remove what the registry does not know. Automatic pauses are the reaper
        # thread's: a short-lived process (a CLI command) does not pause sessions on its way.
        self.reap(pause_idle=start_reaper)
        self._reaper: threading.Thread | None = None
        if start_reaper:
            self._reaper = threading.Thread(target=self._reap_loop, name="execbox-session-reaper", daemon=True)
            self._reaper.start()

    def create(
        self,
        user_id: str,
        language: str = "python",
        image: str | None = None,
        limits: Limits | dict[str, Any] | None = None,
        network: str | NetworkPolicy | dict[str, Any] | None = None,
        idle_timeout: float | None = None,
        max_lifetime: float | None = None,
        *,
        tenant: str = "default",
        repl: bool | None = None,
        secrets: dict[str, Secret] | dict[str, dict[str, Any]] | None = None,
        network_ceiling: NetworkPolicy | None = None,
        isolation: str | None = None,
        pause_after: float | None = None,
        checkpoint_quota: int | None = None,
    ) -> SessionInfo:
        """Start a session for ``user_id``; SessionLimitError over a cap.

        ``network`` ("none", "proxy", a ``NetworkPolicy`` or its dict) and ``secrets`` are as
        for an execution, for every call of the session; ``network_ceiling`` (a tenant's
        policy) caps the session's policy: a request must be allowed by both. ``isolation`` is
        ``"container"`` or ``"gvisor"`` (default: ``config.isolation``). ``pause_after``: pause
        the session to disk after that many seconds unused (gvisor only; default
        ``config.pause_after`` for gvisor sessions); ``checkpoint_quota``: the bytes the
        tenant's paused sessions may hold on disk together (default ``config.checkpoint_quota``).
        """
        self._check_open()
        check_id("tenant", tenant)
        check_id("user_id", user_id)
        runtime = get_runtime(language)
        if repl is None:
            repl = runtime.name in REPL_ARGV
        elif repl and runtime.name not in REPL_ARGV:
            raise InvalidRequestError("repl", f"{runtime.name} sessions run each call afresh: use repl=false")
        policy, secret_values = network_request(network, secrets)
        lim = self._limits(limits)
        cfg = self.config
        idle = cfg.idle_timeout if idle_timeout is None else float(idle_timeout)
        life = cfg.max_lifetime if max_lifetime is None else float(max_lifetime)
        for field, value, most in (
            ("idle_timeout", idle, cfg.idle_timeout_limit),
            ("max_lifetime", life, cfg.max_lifetime_limit),
        ):
            if not 0 < value <= most:
                raise InvalidRequestError(field, f"must be more than 0 and at most {most:g} seconds")
        iso = self.config.isolation if isolation is None else check_isolation(isolation)
        pause = self._pause_after(pause_after, iso, idle)
        image_tag = self._resolve_image(image)
        now = time.time()
        rec = Record(
            id="ses_" + _secrets.token_hex(12),
            tenant=tenant,
            user_id=user_id,
            language=runtime.name,
            repl=repl,
            image=image_tag,
            limits=lim,
            isolation=iso,
            status="creating",
            created_at=now,
            last_used_at=now,
            idle_timeout=idle,
            max_lifetime=life,
            uid=0,
            token=_secrets.token_urlsafe(24),
            registry=self.registry_id,
            creator=owner_id(),
            pause_after=pause,
            checkpoint_quota=cfg.checkpoint_quota if checkpoint_quota is None else checkpoint_quota,
        )
        self._reserve(rec)
        try:
            grant = None if policy is None else self._grant(rec, policy, secret_values, network_ceiling)
            link = self._start(rec, grant)
        except BaseException:
            self._end(rec, "its creation failed")
            raise
        rec.status = "ready"
        rec.container_id = link.container_id
        if not self.store.put_record(RECORD_KIND, rec.key, rec.model_dump(mode="json"), rec.record_ttl(), "update"):
            link.close()
            self._end(rec, "it was deleted while it was created")
            raise SessionNotFoundError(f"session {rec.id} was deleted while it was created")
        with self._lock:
            self._links[rec.id] = link
        log.info(
            "session %s created",
            rec.id,
            extra={"session_id": rec.id, "tenant": tenant, "user_id": user_id, "language": rec.language},
        )
        self._counts["created"] += 1
        return rec.info()

    def get(self, session_id: str, *, tenant: str = "default") -> SessionInfo:
        """The session, or SessionNotFoundError (also for another tenant's)."""
        return self._record(tenant, session_id).info()

    def list(self, tenant: str = "default", user_id: str | None = None) -> list[SessionInfo]:
        """The tenant's live sessions (of one user, with ``user_id``), oldest first."""
        check_id("tenant", tenant)
        now = time.time()
        out = [
            rec.info()
            for rec in self._records(prefix=f"{tenant}/")
            if (user_id is None or rec.user_id == user_id) and rec.expires_at() > now
        ]
        return sorted(out, key=lambda s: s.created_at)

    def stats(self) -> dict[str, int]:
        """Gauges: live sessions in the registry (every replica's), this process's connections to
        them, and the sessions this object created and ended."""
        now = time.time()
        live = [r for r in self._records() if r.expires_at() > now]
        with self._lock:
            attached = len(self._links)
        creating = sum(1 for r in live if r.status == "creating")
        return {"live": len(live), "creating": creating, "attached": attached, **self._counts}

    def delete(self, session_id: str, *, tenant: str = "default") -> None:
        """End the session now (a call running in it ends too); SessionNotFoundError if there is none."""
        rec = self._record(tenant, session_id)
        self._end(rec, "deleted")

    def close(self, end_sessions: bool = False) -> None:
        """Stop the reaper and drop connections; sessions live on unless ``end_sessions``."""
        self._closed = True
        self._stop.set()
        if self._reaper is not None and self._reaper is not threading.current_thread():
            self._reaper.join(timeout=30)
        if end_sessions:
            for rec in self._records():
                self._end(rec, "closed")
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            if not link.in_use:
                link.close()
        self._close_egress()
        if self._owns_store:
            self.store.close()
        if self.uids.store is not None:
            self.uids.store.close()

    def __enter__(self) -> Sessions:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _pause_after(self, asked: float | None, isolation: str, idle: float) -> float | None:
        """The session's automatic pause: as asked (checked), else the default for gvisor sessions."""
        if asked is None:
            default = self.config.pause_after
            return default if isolation == "gvisor" and default is not None and default < idle else None
        if isolation != "gvisor":
            raise InvalidRequestError(
                "pause_after", f"only sessions under isolation 'gvisor' can pause (this one would be {isolation!r})"
            )
        if not 0 < asked < idle:
            raise InvalidRequestError("pause_after", f"must be more than 0 and less than idle_timeout ({idle:g} s)")
        return float(asked)

    def _limits(self, limits: Limits | dict[str, Any] | None) -> Limits:
        return resolve_limits(self.config.default_limits, self.config.max_limits, limits)

    def _resolve_image(self, name: str | None) -> str:
        from ..images import resolve_image_name

        return resolve_image_name(self.engine, name or self.image)
