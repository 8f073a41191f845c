"""Container engines: ``base.Engine`` and one module per implementation.

An engine is opened from a URL (``open_engine``), so that nothing above this
package names an implementation:

- ``docker:`` (the default): the Docker Engine of ``DOCKER_HOST``, or the local socket;
- ``unix:///path/to/docker.sock``, a socket path, or ``tcp://host:port``: that Docker Engine;
- ``local:``: the in-package fake (sandboxes as local processes, no isolation; unit tests only).
"""

from __future__ import annotations

from .base import Channel, Engine, NetworkInfo, ResourceInfo, SandboxSpec, SandboxState

__all__ = ["Channel", "Engine", "NetworkInfo", "ResourceInfo", "SandboxSpec", "SandboxState", "open_engine"]


def open_engine(url: str | None = None, timeout: float = 60) -> Engine:
    """The engine a URL names (see the module docstring); ``None`` or ``""`` is ``docker:``."""
    from ..exceptions import ConfigurationError

    url = (url or "docker:").strip()
    if url == "local:":
        from .local import LocalEngine

        return LocalEngine()
    address = url.removeprefix("docker:")
    if address.startswith("/"):
        address = "unix://" + address
    if address and not address.startswith(("unix://", "tcp://", "ssh://")):
        raise ConfigurationError(
            f"unsupported engine URL {url!r}: use docker:, unix:///path/to/docker.sock, tcp://host:port or local:"
        )
    from .docker import DockerEngine

    return DockerEngine.from_url(address or None, timeout=timeout)
