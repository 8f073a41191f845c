"""Settings of the HTTP service: the only place execbox reads environment variables.

Every field can be set as ``EXECBOX_<FIELD>`` (e.g. ``EXECBOX_TENANTS_FILE``,
``EXECBOX_MAX_CONCURRENT``); ``execbox serve`` flags override them. The library
itself never reads the environment: it takes explicit objects.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from .engine.base import Isolation
from .models import Size

__all__ = ["Settings", "settings_table"]


class Settings(BaseSettings):
    """Configuration of ``execbox serve`` (see the README's "HTTP API" section)."""

    model_config = SettingsConfigDict(env_prefix="EXECBOX_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", description="Address to bind; loopback by default.")
    port: int = Field(8080, ge=0, le=65535, description="Port to bind.")

    tenants_file: Path | None = Field(None, description="TOML file of tenants and their hashed API keys.")
    api_keys: dict[str, str] = Field(
        default_factory=dict,
        description='Extra keys as {"tenant": "key or sha256:<hex>"} (JSON in EXECBOX_API_KEYS); '
        "such tenants get the default policy unless the tenants file defines them.",
    )
    no_auth: bool = Field(False, description="Serve without API keys (local use only; loopback binds only).")

    engine_url: str | None = Field(
        None,
        description="Container engine: docker: (DOCKER_HOST or the local socket; the default),"
        " unix:///path/to/docker.sock or tcp://host:port.",
    )
    api_key: str | None = Field(None, description="API key the CLI sends to a service (--server); not a server key.")
    image: str | None = Field(None, description="Default sandbox image (default: the locally built one).")
    isolation: Isolation = Field(
        "container",
        description="Isolation of runs and sessions that name none: container (runc) or gvisor (runsc; needs the"
        " runtimes scripts/setup.sh registers).",
    )
    state_url: str | None = Field(
        None, description="State store: redis://... or sqlite:///path (default: SQLite under data_dir)."
    )
    data_dir: str = Field("/var/lib/execbox", description="Where the service keeps state (SQLite) and volumes.")
    reap_interval: float = Field(60.0, gt=0, description="Seconds between reaper passes (orphans, idle volumes).")
    proxy_host_map: dict[str, str] = Field(
        default_factory=dict,
        description='Egress upstream overrides as {"api.example.test": "127.0.0.1:8081"} (JSON in'
        " EXECBOX_PROXY_HOST_MAP): the proxy sends that hostname to that address.",
    )
    egress_network: str = Field(
        "execbox-egress",
        description="Docker network of sandboxes with egress. Stable across restarts, with egress_proxy_port:"
        " sessions with egress keep the proxy's address in their environment (two services on one engine need"
        " different values).",
    )
    egress_proxy_port: int = Field(
        3128, ge=1, le=65535, description="Port of the egress proxy on that network's gateway (stable, as above)."
    )
    max_code_bytes: int = Field(1 << 20, gt=0, description="Largest program source; larger gives 413.")
    max_body_bytes: int = Field(8 << 20, gt=0, description="Largest request body; larger gives 413.")

    max_concurrent: int = Field(4, ge=1, description="Executions running at once, all tenants together.")
    max_queue: int = Field(64, ge=0, description="Requests waiting for a slot beyond which new ones get 503.")
    queue_timeout: float = Field(30.0, gt=0, description="Longest wait in the queue before a 503.")
    retry_after: int = Field(2, ge=1, description="Retry-After (s) sent with 503 answers.")

    queue_url: str | None = Field(
        None,
        description="Redis (redis://...) of a cluster: `execbox serve` dispatches runs to `execbox node` workers"
        " through it (and keeps async jobs there); `execbox node` takes runs from it. Unset: runs in-process, and"
        " async jobs in state_url when it is a Redis URL, else in this process (one replica only).",
    )
    node_name: str | None = Field(None, description="`execbox node`: its name (on results); default: the host name.")
    node_slots: int = Field(4, ge=1, description="`execbox node`: runs it takes at once.")
    node_ttl: float = Field(
        10.0, gt=0, description="`execbox node`: its liveness key's TTL; a node silent this long is lost."
    )
    node_metrics: str | None = Field(
        None,
        description="`execbox node`: serve its own Prometheus `/metrics` at this PORT (on 127.0.0.1) or HOST:PORT;"
        " unset: none (the API's `/metrics` has every node's series anyway).",
    )
    job_ttl: float = Field(3600.0, gt=0, description="Seconds a finished async execution's result is kept.")
    max_jobs: int = Field(
        10_000, ge=1, description="Async executions kept at once: any status (embedded), unfinished (Redis queue)."
    )
    max_pending_jobs_per_tenant: int = Field(
        100, ge=1, description="Queued or running async executions per tenant (across replicas with a Redis queue)."
    )
    job_heartbeat_ttl: float = Field(
        10.0,
        gt=0,
        description="A replica whose heartbeat key is this many seconds old is dead: others take its queued jobs"
        " and fail (or, with retries, restart) its running ones.",
    )

    webhook_timeout: float = Field(10.0, gt=0, description="Timeout of one webhook delivery attempt.")
    webhook_attempts: int = Field(5, ge=1, description="Delivery attempts of a webhook before giving up.")
    webhook_backoff: float = Field(
        1.0, gt=0, description="Seconds before the second attempt; each later wait is 4 times the previous one."
    )
    allow_private_callbacks: bool = Field(
        False,
        description="Allow callback URLs that resolve to loopback, private or link-local addresses "
        "(off by default: otherwise tenants could make the service call internal hosts).",
    )

    sessions: bool = Field(True, description="Serve persistent per-user sessions (/v1/sessions).")
    session_store_url: str | None = Field(
        None,
        description="Registry of sessions (redis://... or sqlite:///path), shared by replicas so that a restart"
        " adopts live sessions; default: state_url, else SQLite under data_dir.",
    )
    session_max_per_user: int = Field(
        3, ge=1, description="Live sessions per user of a tenant (across nodes with a queue URL); beyond: 429."
    )
    session_max_total: int = Field(
        32, ge=1, description="Live sessions in all (every tenant); beyond: 429. On `execbox node`: that node's."
    )
    session_idle_timeout: float = Field(600.0, gt=0, description="Default idle timeout of a session (s).")
    session_max_lifetime: float = Field(3600.0, gt=0, description="Default max lifetime of a session (s).")
    session_idle_timeout_limit: float = Field(86400.0, gt=0, description="Largest idle timeout a client may ask.")
    session_max_lifetime_limit: float = Field(86400.0, gt=0, description="Largest max lifetime a client may ask.")
    session_reap_interval: float = Field(5.0, gt=0, description="Seconds between passes of the session reaper.")
    session_pause_after: float | None = Field(
        None,
        gt=0,
        description="Default pause_after of gvisor sessions: paused to disk after this many seconds unused (and"
        " resumed by their next call); unset: only when asked.",
    )
    session_checkpoint_quota: Size = Field(
        2 << 30,
        ge=0,
        description="Disk (bytes, or e.g. 2g) one tenant's paused sessions' checkpoints may hold together, unless"
        " its policy sets checkpoint_quota; a pause beyond it is refused (409 naming checkpoint_quota).",
    )

    pool_min_ready: int = Field(2, ge=0, description="Warm sandboxes kept ready per pooled language (0: no pool).")
    pool_max_total: int = Field(8, ge=0, description="Cap on ready plus in-creation pooled sandboxes.")
    volume_quota: int = Field(256 << 20, ge=8 << 20, description="Size of each user's volume, in bytes.")
    volume_max_idle: float = Field(30 * 86400, gt=0, description="Volumes unused this many seconds are removed.")

    shutdown_grace: float = Field(30.0, ge=0, description="On SIGTERM, how long in-flight executions may finish.")
    log_level: str = Field("info", description="debug, info, warning or error.")
    log_json: bool = Field(True, description="Structured JSON logs on stderr (else plain text).")

    def session_store(self) -> str:
        """The URL of the session registry: ``session_store_url``, else ``state_url``, else SQLite in data_dir."""
        return self.session_store_url or self.state_store()

    def job_queue(self) -> str | None:
        """The Redis of shared async jobs: ``queue_url``, else ``state_url`` if it is Redis, else None (embedded)."""
        if self.queue_url is not None:
            return self.queue_url
        if self.state_url is not None and self.state_url.startswith(("redis://", "rediss://", "unix://")):
            return self.state_url
        return None

    def state_store(self) -> str:
        """The URL of the state store: ``state_url``, else SQLite in data_dir (the embedded default)."""
        return self.state_url or f"sqlite:///{self.data_dir}/state.db"


def settings_table() -> str:
    """The README's table of settings (a test checks that the README holds exactly this)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
        shown = "-" if default in (None, {}, "") else f"`{default}`"
        meaning = (field.description or "").replace("|", "\\|")
        rows.append(f"| `EXECBOX_{name.upper()}` | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"
