"""Async executions (jobs): a bounded, expiring, tenant-namespaced store, and signed webhooks.

A job is visible only to its tenant: looking up another tenant's id answers
exactly like an unknown id. Finished jobs are forgotten ``ttl`` seconds after
they finish. Webhooks are POSTed with ``X-Execbox-Signature: sha256=<hex>``, the
HMAC-SHA256 of the raw body under the tenant's webhook secret.

Callback URLs are checked against SSRF: the host is resolved once, every address
must be a public one (unless ``allow_private``), and the delivery connects to
that very address (so a DNS answer cannot change between check and use).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import httpx

from ..exceptions import InvalidRequestError
from ..models import ExecutionRequest, ExecutionResult
from .auth import sign
from .schemas import ErrorBody, ExecutionJob, JobStatus

__all__ = ["Job", "JobStore", "WebhookSender", "check_callback_url", "resolve_callback"]

log = logging.getLogger("execbox.server.jobs")

SIGNATURE_HEADER = "X-Execbox-Signature"


@dataclass
class Job:
    id: str
    tenant: str
    request: ExecutionRequest
    created_at: float
    callback_url: str | None = None
    status: JobStatus = "queued"
    started_at: float | None = None
    finished_at: float | None = None
    result: ExecutionResult | None = None
    error: ErrorBody | None = None
    callback_status: Literal["pending", "delivered", "failed"] | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def view(self, ttl: float) -> ExecutionJob:
        return ExecutionJob(
            id=self.id,
            status=self.status,
            language=self.request.language,
            created_at=self.created_at,
            started_at=self.started_at,
            finished_at=self.finished_at,
            expires_at=self.finished_at + ttl if self.finished_at is not None else None,
            result=self.result,
            error=self.error,
            callback_url=self.callback_url,
            callback_status=self.callback_status,
        )


class JobStore:
    """Jobs by (tenant, id); bounded in number, finished ones expire."""

    def __init__(self, ttl: float, max_jobs: int, clock: Callable[[], float] = time.time) -> None:
        self.ttl, self.max_jobs, self.clock = ttl, max_jobs, clock
        self._jobs: dict[tuple[str, str], Job] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def new_id(self) -> str:
        return "ex_" + secrets.token_urlsafe(18)

    def has_room(self) -> bool:
        self.purge()
        return len(self._jobs) < self.max_jobs

    def add(self, job: Job) -> None:
        self._jobs[(job.tenant, job.id)] = job

    def get(self, tenant: str, job_id: str) -> Job | None:
        job = self._jobs.get((tenant, job_id))
        if job is not None and self._expired(job, self.clock()):
            del self._jobs[(tenant, job_id)]
            return None
        return job

    def unfinished(self) -> list[Job]:
        return [j for j in self._jobs.values() if j.finished_at is None]

    def pending(self, tenant: str) -> int:
        return sum(1 for (t, _), j in self._jobs.items() if t == tenant and j.finished_at is None)

    def purge(self) -> int:
        now = self.clock()
        dead = [k for k, j in self._jobs.items() if self._expired(j, now)]
        for k in dead:
            del self._jobs[k]
        return len(dead)

    def _expired(self, job: Job, now: float) -> bool:
        return job.finished_at is not None and job.finished_at + self.ttl <= now


def check_callback_url(url: str) -> tuple[str, str, int]:
    """Syntax check of a callback URL; returns (scheme, host, port) or raises InvalidRequestError."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise InvalidRequestError("callback_url", f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidRequestError("callback_url", "must be an http:// or https:// URL")
    if not parts.hostname:
        raise InvalidRequestError("callback_url", "has no host")
    if parts.username is not None or parts.password is not None:
        raise InvalidRequestError("callback_url", "must not carry credentials")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def _public(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not addr.is_multicast


async def resolve_callback(url: str, allow_private: bool) -> str:
    """The address to deliver ``url`` to, after the SSRF check; InvalidRequestError if refused."""
    _, host, port = check_callback_url(url)
    try:
        literal = ipaddress.ip_address(host)
        addresses: list[str] = [str(literal)]
    except ValueError:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            raise InvalidRequestError("callback_url", f"cannot resolve host {host!r}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise InvalidRequestError("callback_url", f"cannot resolve host {host!r}")
    if not allow_private:
        for a in addresses:
            if not _public(ipaddress.ip_address(a.split("%")[0])):
                raise InvalidRequestError(
                    "callback_url", "resolves to a loopback, private or reserved address; not allowed on this server"
                )
    return addresses[0]


class WebhookSender:
    """POSTs signed job results to callback URLs, with a few retries."""

    def __init__(
        self, timeout: float, attempts: int, allow_private: bool, on_outcome: Callable[[str], None] | None = None
    ) -> None:
        self.timeout, self.attempts, self.allow_private = timeout, attempts, allow_private
        self.on_outcome = on_outcome
        self.backoff = 0.5

    async def deliver(self, url: str, body: bytes, secret: str) -> bool:
        """True once a 2xx answer arrived; False after the last failed attempt."""
        try:
            address = await resolve_callback(url, self.allow_private)
        except InvalidRequestError as exc:
            log.warning("webhook refused: %s", exc.message)
            self._count("refused")
            return False
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"[{address}]" if ":" in address else address
        if parts.port is not None:
            netloc += f":{parts.port}"
        pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "execbox-webhook",
            "Host": parts.netloc.rpartition("@")[2],
            SIGNATURE_HEADER: sign(secret, body),
        }
        # trust_env=False: never route webhooks through a proxy from the environment.
        async with httpx.AsyncClient(timeout=self.timeout, trust_env=False, follow_redirects=False) as client:
            for attempt in range(1, self.attempts + 1):
                try:
                    resp = await client.post(pinned, content=body, headers=headers, extensions={"sni_hostname": host})
                    if 200 <= resp.status_code < 300:
                        self._count("delivered")
                        return True
                    retry = resp.status_code >= 500 or resp.status_code == 429
                    log.warning("webhook answered %d", resp.status_code, extra={"attempt": attempt})
                except httpx.HTTPError as exc:
                    retry = True
                    log.warning("webhook delivery failed: %s", type(exc).__name__, extra={"attempt": attempt})
                if not retry or attempt == self.attempts:
                    break
                await asyncio.sleep(self.backoff * 4 ** (attempt - 1))
        self._count("failed")
        return False

    def _count(self, outcome: str) -> None:
        if self.on_outcome is not None:
            self.on_outcome(outcome)
