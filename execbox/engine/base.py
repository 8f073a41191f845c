"""The small interface every container engine implements.

Only modules in this package talk to a container engine. The executor builds a
``SandboxSpec`` (engine-neutral: image, command, user, limits, labels) and drives
a sandbox through create -> attach -> start -> (kill) -> remove.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from ..exceptions import EngineError

__all__ = [
    "ISOLATIONS",
    "Channel",
    "Engine",
    "ImageInfo",
    "Isolation",
    "NetworkInfo",
    "ResourceInfo",
    "SandboxSpec",
    "SandboxState",
    "Tmpfs",
]

STDOUT = 1
STDERR = 2

Isolation = Literal["container", "gvisor"]
"""What stands between a sandbox and the host kernel: ``container`` (namespaces, cgroups and
seccomp on the host kernel: runc) or ``gvisor`` (the same, around gVisor's application
kernel, which answers the program's system calls itself: runsc)."""
ISOLATIONS: tuple[Isolation, ...] = get_args(Isolation)


@dataclass(frozen=True)
class Tmpfs:
    """A size- and inode-capped in-memory filesystem, owned by the sandbox's user."""

    size: int  # bytes
    inodes: int
    mode: int  # e.g. 0o700, 0o1777
    uid: int
    nosuid: bool = True
    nodev: bool = True


@dataclass(frozen=True)
class SandboxSpec:
    """Everything needed to create one sandbox, in no engine's terms.

    ``seccomp`` is a profile in the OCI format (as ``execbox.seccomp.profile()`` makes);
    ``network`` is None (no network: loopback only) or the name of an internal network
    made by ``Engine.ensure_internal_network``; ``isolation`` is the kind of runtime.
    Each engine maps these to its own kind.
    """

    image: str
    command: tuple[str, ...]
    user: str
    labels: dict[str, str]
    memory_bytes: int
    nano_cpus: int
    pids: int
    tmpfs: dict[str, Tmpfs]
    seccomp: dict[str, Any]
    nofile: int = 1024
    nproc: int = 0
    network: str | None = None
    read_only: bool = True
    working_dir: str = "/work"
    hostname: str = "sandbox"
    shm_bytes: int = 16 << 20
    env: dict[str, str] = field(default_factory=dict)  # never secrets: sandbox-wide constants only
    volumes: dict[str, str] = field(default_factory=dict)  # named volume -> mount path (per-user data)
    dns_options: tuple[str, ...] = ()  # resolv.conf options (egress runs: give up on lookups quickly)
    isolation: Isolation = "container"
    cpu_period_us: int = 0  # the window nano_cpus is enforced over (0: the engine's own, 100 ms)


@dataclass(frozen=True)
class SandboxState:
    running: bool
    exit_code: int | None
    oom_killed: bool


@dataclass(frozen=True)
class ResourceInfo:
    """A container, volume or network carrying execbox labels."""

    kind: str  # "container" | "volume" | "network"
    id: str
    labels: dict[str, str]


@dataclass(frozen=True)
class ImageInfo:
    """An image on the engine."""

    id: str
    tags: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    user: str = ""  # the user its containers run as unless told otherwise
    size: int = 0
    created: int = 0  # unix time


@dataclass(frozen=True)
class NetworkInfo:
    """An internal network for egress sandboxes (no route out; the host is its gateway)."""

    name: str
    id: str
    bridge: str  # the host's interface of the network (firewall rules name it)
    gateway: str
    subnet: str
    internal: bool = True


class Channel(ABC):
    """The sandbox's attached stdin/stdout/stderr."""

    @abstractmethod
    def send(self, data: bytes) -> None: ...

    @abstractmethod
    def recv(self, timeout: float) -> tuple[int, bytes] | None:
        """Next chunk as (STDOUT|STDERR, bytes); None at end of stream.

        Raises TimeoutError if nothing arrives within ``timeout`` seconds.
        """

    @abstractmethod
    def close(self) -> None: ...

    def alive(self) -> bool:
        """False when the stream has already ended (the sandbox died while waiting)."""
        return True


class Engine(ABC):
    """A container engine (Docker first)."""

    name: str = "engine"

    @abstractmethod
    def ping(self) -> None:
        """Raise EngineUnavailableError unless the engine answers."""

    @abstractmethod
    def image_exists(self, image: str) -> bool: ...

    @abstractmethod
    def create(self, spec: SandboxSpec) -> str:
        """Create (not start) a sandbox; return its id."""

    @abstractmethod
    def attach(self, sandbox_id: str) -> Channel:
        """Attach to stdin/stdout/stderr; call before start so no output is lost."""

    @abstractmethod
    def start(self, sandbox_id: str) -> None: ...

    @abstractmethod
    def kill(self, sandbox_id: str) -> None:
        """SIGKILL everything in the sandbox; no error if it already stopped."""

    @abstractmethod
    def wait(self, sandbox_id: str, timeout: float) -> SandboxState:
        """Wait up to ``timeout`` s for the sandbox to stop; return its state either way."""

    @abstractmethod
    def state(self, sandbox_id: str) -> SandboxState: ...

    @abstractmethod
    def remove(self, sandbox_id: str) -> None:
        """Force-remove a sandbox; no error if it is already gone."""

    @abstractmethod
    def list_resources(self, label: str) -> list[ResourceInfo]:
        """Every container, volume and network carrying ``label``."""

    @abstractmethod
    def remove_resource(self, resource: ResourceInfo) -> None: ...

    def exec(self, sandbox_id: str, argv: tuple[str, ...], user: str) -> Channel:
        """Start ``argv`` in a running sandbox as ``user``; its stdin/stdout/stderr attached."""
        raise EngineError(f"the {self.name} engine cannot start a process in a running sandbox")

    def checkpoint(self, sandbox_id: str, name: str) -> None:
        """Save the running sandbox's memory and state as checkpoint ``name`` and stop it."""
        raise EngineError(f"the {self.name} engine cannot checkpoint sandboxes")

    def restore(self, sandbox_id: str, name: str, *, attach: bool = False) -> Channel | None:
        """Start the sandbox again from checkpoint ``name`` (then forget the checkpoint). With
        ``attach``: a stream attached before the start that succeeded (see ``attach``)."""
        raise EngineError(f"the {self.name} engine cannot restore sandboxes")

    def checkpoint_size(self, sandbox_id: str, name: str) -> int | None:
        """Bytes checkpoint ``name`` of the sandbox holds on disk; None if this engine cannot tell."""
        return None

    # -- networks (egress; engines without them refuse) ---------------------------------------

    def ensure_internal_network(self, name: str, bridge: str, labels: dict[str, str]) -> NetworkInfo:
        """Find or create network ``name``: internal (no route out), no traffic between its
        sandboxes, the host side named ``bridge``. Raises ConfigurationError if a network of
        that name exists and is not internal."""
        raise EngineError(f"the {self.name} engine has no networks")

    def remove_network(self, name: str) -> None:
        """Remove the network; no error if it is already gone."""
        raise EngineError(f"the {self.name} engine has no networks")

    # -- images (engines without them refuse) -------------------------------------------------

    def image_info(self, ref: str) -> ImageInfo | None:
        """The image ``ref`` names, or None if there is none."""
        raise EngineError(f"the {self.name} engine has no images")

    def images(self, labels: list[str], dangling: bool | None = None) -> list[ImageInfo]:
        """Images carrying every label filter of ``labels`` ("key" or "key=value")."""
        raise EngineError(f"the {self.name} engine has no images")

    def import_image(self, tarball: Path, ref: str, labels: dict[str, str]) -> None:
        """Make image ``ref`` ("repo:tag") from a root filesystem tarball."""
        raise EngineError(f"the {self.name} engine cannot import images")

    def build_image(
        self, context: dict[str, tuple[bytes, int]], tag: str, labels: dict[str, str], nocache: bool = False
    ) -> Iterator[str]:
        """Build ``tag`` from a context of files (name -> (content, mode)) with a Dockerfile;
        yield its progress lines. A failed build raises EngineError with the engine's reason."""
        raise EngineError(f"the {self.name} engine cannot build images")

    def tag_image(self, ref: str, repository: str, tag: str) -> None:
        raise EngineError(f"the {self.name} engine has no images")

    def remove_image(self, ref: str) -> None:
        raise EngineError(f"the {self.name} engine has no images")

    # -- named volumes (per-user data; engines without them refuse) ----------------------------

    def ensure_volume(self, name: str, device: str, labels: dict[str, str]) -> None:
        """Create volume ``name`` as a bind of the host directory ``device``, unless it exists."""
        raise EngineError(f"the {self.name} engine has no volumes")

    def volume_labels(self, name: str) -> dict[str, str] | None:
        """The volume's labels, or None if there is no such volume."""
        raise EngineError(f"the {self.name} engine has no volumes")

    def remove_volume(self, name: str) -> bool:
        """Remove the volume (False: there was none); ``VolumeBusyError`` while a container uses it."""
        raise EngineError(f"the {self.name} engine has no volumes")

    def volume_in_use(self, name: str) -> bool:
        """True while a running sandbox mounts the volume (whoever made it)."""
        raise EngineError(f"the {self.name} engine has no volumes")

    def close(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release the engine client."""
