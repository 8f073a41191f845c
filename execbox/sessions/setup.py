"""``Sessions`` beside an ``Executor``, configured by the service's settings: one recipe for the
API process (``execbox serve``) and for a node (``execbox node``)."""

from __future__ import annotations

from ..executor import Executor
from ..settings import Settings
from ..state import open_store
from .core import Sessions
from .models import SessionsConfig

__all__ = ["sessions_beside"]


def sessions_beside(settings: Settings, executor: Executor, store_url: str) -> Sessions:
    """Sessions on the executor's engine, with its image, isolation, limits and egress proxy (one proxy
    per process); everything else from ``settings``; the registry at ``store_url``."""
    config = SessionsConfig(
        image=executor.image,
        isolation=executor.config.isolation,
        default_limits=executor.config.default_limits,
        max_limits=executor.config.max_limits,
        max_code_bytes=settings.max_code_bytes,
        max_per_user=settings.session_max_per_user,
        max_total=settings.session_max_total,
        idle_timeout=settings.session_idle_timeout,
        max_lifetime=settings.session_max_lifetime,
        idle_timeout_limit=settings.session_idle_timeout_limit,
        max_lifetime_limit=settings.session_max_lifetime_limit,
        reap_interval=settings.session_reap_interval,
        pause_after=settings.session_pause_after,
        checkpoint_quota=settings.session_checkpoint_quota,
        data_dir=settings.data_dir,
    )
    return Sessions(executor.engine, open_store(store_url), config, own_store=True, egress=executor.egress)
