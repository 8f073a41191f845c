"""Which destination addresses the proxy refuses, whatever name led to them.

The check runs on the address the proxy is about to connect to, after resolution,
and that address is then the one connected to: a name that resolves to a public
address at policy time and to 127.0.0.1 a moment later (DNS rebinding) cannot
sneak through, because there is no second resolution.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable

__all__ = ["Resolver", "forbidden_reason", "pick_address"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

_METADATA = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254")}


def forbidden_reason(address: str) -> str | None:
    """Why ``address`` (an IP literal) must not be connected to, or None if it is a public address."""
    try:
        ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            ip = mapped
        elif ip.teredo is not None:
            ip = ip.teredo[1]
    if ip in _METADATA:
        return f"{ip} is a cloud metadata address"
    if ip.is_loopback:
        return f"{ip} is a loopback address"
    if ip.is_link_local:
        return f"{ip} is a link-local address"
    if ip.is_private:
        return f"{ip} is a private address"
    if ip.is_multicast or ip.is_unspecified or ip.is_reserved or not ip.is_global:
        return f"{ip} is not a public unicast address"
    return None


async def pick_address(host: str, port: int, resolve: Resolver) -> tuple[str | None, str | None]:
    """(address to connect to, None) or (None, reason to refuse).

    Every address the name resolves to must be public: a name that mixes public and
    private records is refused rather than tried in some order.
    """
    try:
        literal = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        literal = None
    if literal is not None:
        reason = forbidden_reason(str(literal))
        return (None, reason) if reason else (str(literal), None)
    try:
        addresses = await resolve(host, port)
    except OSError as exc:
        return None, f"cannot resolve {host}: {exc}"
    if not addresses:
        return None, f"{host} resolves to no address"
    for addr in addresses:
        reason = forbidden_reason(addr)
        if reason:
            return None, f"{host} resolves to {reason}"
    return addresses[0], None


def system_resolver() -> Resolver:
    """getaddrinfo through the running event loop (TCP addresses only, de-duplicated)."""
    import asyncio

    async def resolve(host: str, port: int) -> list[str]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    return resolve
