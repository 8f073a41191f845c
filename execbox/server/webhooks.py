"""Webhooks of async jobs: callback URL checks (SSRF) and signed, de-duplicable deliveries.

A delivery POSTs the finished job with ``X-Execbox-Signature: sha256=<hex>`` (the
HMAC-SHA256 of the raw body under the tenant's webhook secret) and
``X-Execbox-Delivery: <job id>``: the same on every attempt, from any replica, so a
receiver that has seen it may answer 2xx and do nothing.

Callback URLs are checked against SSRF: the host is resolved once, every address
must be a public one (unless ``allow_private``), and the delivery connects to
that very address (so a DNS answer cannot change between check and use).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable
from typing import Literal
from urllib.parse import urlsplit, urlunsplit

import httpx

from ..exceptions import InvalidRequestError
from .auth import sign

__all__ = [
    "DELIVERY_HEADER",
    "SIGNATURE_HEADER",
    "Attempt",
    "WebhookSender",
    "check_callback_url",
    "resolve_callback",
]

log = logging.getLogger("execbox.server.webhooks")

SIGNATURE_HEADER = "X-Execbox-Signature"
DELIVERY_HEADER = "X-Execbox-Delivery"

Attempt = Literal["delivered", "retry", "failed"]
"""One attempt's outcome: a 2xx; worth another try (5xx, 429, no answer); or never worth one."""


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
    """POSTs signed job results to callback URLs; ``attempts`` tries, ``backoff * 4**n`` s apart."""

    def __init__(
        self,
        timeout: float,
        attempts: int,
        allow_private: bool,
        on_outcome: Callable[[str], None] | None = None,
        backoff: float = 0.5,
    ) -> None:
        self.timeout, self.attempts, self.allow_private = timeout, attempts, allow_private
        self.on_outcome = on_outcome
        self.backoff = backoff

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return float(self.backoff * 4 ** (attempt - 1))

    async def attempt(self, url: str, body: bytes, secret: str, delivery_id: str, attempt: int = 1) -> Attempt:
        """One delivery attempt (counted in the metrics only when it ends the delivery)."""
        try:
            address = await resolve_callback(url, self.allow_private)
        except InvalidRequestError as exc:
            log.warning("webhook refused: %s", exc.message, extra={"job_id": delivery_id})
            self._count("refused")
            return "failed"
        parts = urlsplit(url)
        netloc = f"[{address}]" if ":" in address else address
        if parts.port is not None:
            netloc += f":{parts.port}"
        pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "execbox-webhook",
            "Host": parts.netloc.rpartition("@")[2],
            SIGNATURE_HEADER: sign(secret, body),
            DELIVERY_HEADER: delivery_id,
        }
        extra = {"job_id": delivery_id, "attempt": attempt}
        # trust_env=False: never route webhooks through a proxy from the environment.
        async with httpx.AsyncClient(timeout=self.timeout, trust_env=False, follow_redirects=False) as client:
            try:
                resp = await client.post(
                    pinned, content=body, headers=headers, extensions={"sni_hostname": parts.hostname or ""}
                )
            except httpx.HTTPError as exc:
                log.warning("webhook delivery failed: %s", type(exc).__name__, extra=extra)
                outcome: Attempt = "retry"
            else:
                if 200 <= resp.status_code < 300:
                    outcome = "delivered"
                else:
                    log.warning("webhook answered %d", resp.status_code, extra=extra)
                    outcome = "retry" if resp.status_code >= 500 or resp.status_code == 429 else "failed"
        if outcome == "retry" and attempt >= self.attempts:
            outcome = "failed"
        if outcome != "retry":
            self._count(outcome)
        return outcome

    async def deliver(self, url: str, body: bytes, secret: str, delivery_id: str) -> bool:
        """All attempts in this process: True once a 2xx answer arrived."""
        for n in range(1, self.attempts + 1):
            outcome = await self.attempt(url, body, secret, delivery_id, n)
            if outcome != "retry":
                return outcome == "delivered"
            await asyncio.sleep(self.delay(n))
        return False

    def _count(self, outcome: str) -> None:
        if self.on_outcome is not None:
            self.on_outcome(outcome)
