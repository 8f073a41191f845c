"""Docker Engine implementation of ``Engine`` (with ``_docker*.py``, the only modules that import ``docker``)."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.errors
import requests.exceptions
from docker.types import LogConfig, Mount, Ulimit

from ..exceptions import ConfigurationError, EngineError, ImageNotFoundError, VolumeBusyError
from . import _kmsg, runsc
from ._docker import DockerChannel, patch_unix_connect, translate
from ._docker_pause import DockerCheckpoints
from .base import (
    Channel,
    Engine,
    ImageInfo,
    Isolation,
    NetworkInfo,
    ResourceInfo,
    SandboxSpec,
    SandboxState,
    Tmpfs,
)

__all__ = ["RUNTIMES_FILE", "DockerEngine", "runtime_of"]

log = logging.getLogger("execbox.engine.docker")
# Seconds a SIGKILLed sandbox's OOM flag may lag its exit: dockerd handles containerd's OOM event
# on its own; under load (the whole suite on 2 cores) it once took more than 1 s.
_OOM_EVENT_WAIT = 3.0

# The Docker runtimes of each isolation, for a sandbox without network and for one on an
# (internal) network. scripts/setup.sh registers them in /etc/docker/daemon.json from
# docker-runtimes.json beside this module. runsc takes its network mode per runtime: its
# own netstack refuses Docker's "none" namespace and (runsc 20221219 with Docker 20.10)
# a user network's too, "cannot run with network enabled in root network namespace";
# "none" gives loopback only, "host" uses the sandbox's own namespace, where the egress
# network's firewall holds. --oci-seccomp makes it apply the sandbox's seccomp profile to
# the program's system calls inside gVisor (without it runsc ignores the profile there:
# ptrace and unshare succeed, measured).
RUNTIMES_FILE = Path(__file__).with_name("docker-runtimes.json")
_RUNTIMES: dict[Isolation, tuple[str | None, str | None]] = {
    "container": (None, None),  # the engine's default (runc)
    "gvisor": ("execbox-gvisor", "execbox-gvisor-hostnet"),
}


def runtime_of(spec: SandboxSpec) -> str | None:
    """The Docker runtime of ``spec`` (None: the engine's default, runc)."""
    return _RUNTIMES[spec.isolation][spec.network is not None]


def _tmpfs_options(t: Tmpfs) -> str:
    flags = ["rw"] + (["nosuid"] if t.nosuid else []) + (["nodev"] if t.nodev else [])
    sizes = [f"size={t.size}", f"nr_inodes={t.inodes}", f"mode={t.mode:04o}", f"uid={t.uid}", f"gid={t.uid}"]
    return ",".join(flags + sizes)


_SECCOMP_JSON: dict[int, tuple[dict[str, Any], str]] = {}


def _seccomp_json(profile: dict[str, Any]) -> str:
    """The profile as Docker takes it (JSON), made once per profile object."""
    cached = _SECCOMP_JSON.get(id(profile))
    if cached is None or cached[0] is not profile:
        cached = (profile, json.dumps(profile, separators=(",", ":")))
        _SECCOMP_JSON[id(profile)] = cached
    return cached[1]


class DockerEngine(DockerCheckpoints, Engine):
    """Sandboxes as Docker containers, through the Docker Engine API."""

    name = "docker"

    def __init__(self, client: docker.APIClient) -> None:
        patch_unix_connect()
        self.api = client
        self._root: Path | None = None  # the engine's data root, once asked (checkpoint sizes)
        self._behind: dict[str, threading.Thread] = {}  # a sandbox's tidying left after a restore

    @classmethod
    def from_env(cls, timeout: float = 60) -> DockerEngine:
        """Connect as the docker CLI would (DOCKER_HOST, or the local socket)."""
        with translate("connect"):
            return cls(docker.from_env(timeout=int(timeout)).api)

    @classmethod
    def from_url(cls, base_url: str | None, timeout: float = 60) -> DockerEngine:
        """Connect to ``base_url`` (unix://, tcp://, ssh://); None: as ``from_env``."""
        if base_url is None:
            return cls.from_env(timeout)
        with translate("connect"):
            return cls(docker.APIClient(base_url=base_url, timeout=int(timeout)))

    def ping(self) -> None:
        with translate("ping"):
            self.api.ping()

    def image_exists(self, image: str) -> bool:
        return self.image_info(image) is not None

    def _host_config(self, spec: SandboxSpec) -> dict[str, Any]:
        ulimits = [Ulimit(name="nofile", soft=spec.nofile, hard=spec.nofile), Ulimit(name="core", soft=0, hard=0)]
        if spec.nproc:
            ulimits.append(Ulimit(name="nproc", soft=spec.nproc, hard=spec.nproc))
        host_config: dict[str, Any] = self.api.create_host_config(
            network_mode=spec.network or "none",
            read_only=spec.read_only,
            tmpfs={path: _tmpfs_options(t) for path, t in spec.tmpfs.items()},
            mem_limit=spec.memory_bytes,
            memswap_limit=spec.memory_bytes,
            nano_cpus=None if spec.cpu_period_us else spec.nano_cpus,
            cpu_period=spec.cpu_period_us or None,
            cpu_quota=spec.nano_cpus * spec.cpu_period_us // 1_000_000_000 or None,
            pids_limit=spec.pids,
            cap_drop=["ALL"],
            security_opt=["no-new-privileges", f"seccomp={_seccomp_json(spec.seccomp)}"],
            init=True,
            ulimits=ulimits,
            shm_size=spec.shm_bytes,
            ipc_mode="private",
            log_config=LogConfig(type="none"),
            auto_remove=False,
            mounts=[Mount(target=path, source=name, type="volume") for name, path in spec.volumes.items()] or None,
            dns_opt=list(spec.dns_options) or None,
            runtime=runtime_of(spec),
        )
        return host_config

    def create(self, spec: SandboxSpec) -> str:
        try:
            return self._create(spec)
        except EngineError as exc:
            runtime = runtime_of(spec)
            if runtime is not None and "runtime" in str(exc).lower():
                raise EngineError(
                    f"isolation {spec.isolation!r} needs the Docker runtime {runtime} (runsc), which this engine"
                    f" does not have: run scripts/setup.sh, which registers it ({exc})"
                ) from exc
            raise

    def _create(self, spec: SandboxSpec) -> str:
        with translate("create sandbox"):
            created = self.api.create_container(
                image=spec.image,
                command=list(spec.command),
                user=spec.user,
                labels=spec.labels,
                environment=spec.env,
                working_dir=spec.working_dir,
                hostname=spec.hostname,
                stdin_open=True,
                tty=False,
                network_disabled=spec.network is None,
                host_config=self._host_config(spec),
            )
        return str(created["Id"])

    def attach(self, sandbox_id: str) -> Channel:
        with translate("attach"):
            io = self.api.attach_socket(sandbox_id, params={"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1})
        sock = getattr(io, "_sock", io)
        return DockerChannel(sock, io)

    def start(self, sandbox_id: str) -> None:
        with translate("start sandbox"):
            self.api.start(sandbox_id)

    def kill(self, sandbox_id: str) -> None:
        try:
            with translate("kill sandbox"):
                self.api.kill(sandbox_id)
        except EngineError as exc:  # already stopped or gone: nothing to kill
            log.debug("kill %s: %s", sandbox_id[:12], exc)

    def wait(self, sandbox_id: str, timeout: float) -> SandboxState:
        try:
            with translate("wait"):
                self.api.wait(sandbox_id, timeout=max(timeout, 0.001))
        except (EngineError, requests.exceptions.ReadTimeout):
            pass
        state = self.state(sandbox_id)
        # A sandbox killed whole by the OOM killer (gVisor's kernel is one process to the
        # host's) may be seen stopped before dockerd has handled its OOM event, or dockerd may
        # never get it: the kernel's log says first-hand (_kmsg.py); else ask again.
        if state.exit_code == 137 and not state.running and not state.oom_killed:
            if _kmsg.memcg_oom_killed(self._full_id(sandbox_id)):
                return SandboxState(running=False, exit_code=137, oom_killed=True)
        deadline = time.monotonic() + _OOM_EVENT_WAIT
        while state.exit_code == 137 and not state.running and not state.oom_killed and time.monotonic() < deadline:
            time.sleep(0.05)
            state = self.state(sandbox_id)
        return state

    def state(self, sandbox_id: str) -> SandboxState:
        with translate("inspect sandbox"):
            st = self.api.inspect_container(sandbox_id)["State"]
        return SandboxState(running=bool(st["Running"]), exit_code=st.get("ExitCode"), oom_killed=bool(st["OOMKilled"]))

    def remove(self, sandbox_id: str) -> None:
        try:
            with translate("remove sandbox"):
                self.api.remove_container(sandbox_id, force=True, v=True)
        except EngineError as exc:
            if "No such container" in str(exc) or "is already in progress" in str(exc):
                return
            raise
        finally:
            runsc.clear_stale_state(sandbox_id)  # what runsc left of a paused sandbox (see runsc.py)

    def list_resources(self, label: str) -> list[ResourceInfo]:
        out: list[ResourceInfo] = []
        with translate("list resources"):
            for c in self.api.containers(all=True, filters={"label": label}):
                out.append(ResourceInfo("container", c["Id"], c.get("Labels") or {}))
            for v in self.api.volumes(filters={"label": label}).get("Volumes") or []:
                out.append(ResourceInfo("volume", v["Name"], v.get("Labels") or {}))
            for n in self.api.networks(filters={"label": label}):
                out.append(ResourceInfo("network", n["Id"], n.get("Labels") or {}))
        return out

    def remove_resource(self, resource: ResourceInfo) -> None:
        if resource.kind == "container":
            self.remove(resource.id)
            return
        try:
            with translate(f"remove {resource.kind}"):
                if resource.kind == "volume":
                    self.api.remove_volume(resource.id, force=True)
                else:
                    self.api.remove_network(resource.id)
        except EngineError as exc:
            if "no such" not in str(exc).lower() and "not found" not in str(exc).lower():
                raise

    def exec(self, sandbox_id: str, argv: tuple[str, ...], user: str) -> Channel:
        with translate(f"exec in sandbox {sandbox_id[:12]}"):
            created = self.api.exec_create(sandbox_id, list(argv), stdin=True, stdout=True, stderr=True, user=user)
            io = self.api.exec_start(created["Id"], socket=True)
        return DockerChannel(getattr(io, "_sock", io), io)

    def ensure_internal_network(self, name: str, bridge: str, labels: dict[str, str]) -> NetworkInfo:
        with translate(f"network {name}"):
            found = [n for n in self.api.networks(names=[name]) if n.get("Name") == name]
            if found:
                net = self.api.inspect_network(found[0]["Id"])
            else:
                created = self.api.create_network(
                    name,
                    driver="bridge",
                    internal=True,
                    labels=labels,
                    options={"com.docker.network.bridge.enable_icc": "false", "com.docker.network.bridge.name": bridge},
                )
                net = self.api.inspect_network(created["Id"])
        if not net.get("Internal"):
            raise ConfigurationError(f"network {name} exists but is not internal")
        config = (net.get("IPAM") or {}).get("Config") or []
        if not config or not config[0].get("Gateway"):
            raise EngineError(f"network {name} has no IPv4 gateway")
        bridge = (net.get("Options") or {}).get("com.docker.network.bridge.name") or f"br-{net['Id'][:12]}"
        return NetworkInfo(name, net["Id"], bridge, config[0]["Gateway"], config[0]["Subnet"])

    def remove_network(self, name: str) -> None:
        try:
            with translate(f"remove network {name}"):
                self.api.remove_network(name)
        except EngineError as exc:
            if "not found" not in str(exc).lower() and "no such" not in str(exc).lower():
                raise

    # -- images ---------------------------------------------------------------------------

    def image_info(self, ref: str) -> ImageInfo | None:
        try:
            with translate(f"inspect image {ref}"):
                info = self.api.inspect_image(ref)
        except ImageNotFoundError:
            return None
        config = info.get("Config") or {}
        created = info.get("Created") or 0
        return ImageInfo(
            id=info["Id"],
            tags=tuple(info.get("RepoTags") or ()),
            labels=dict(config.get("Labels") or {}),
            user=str(config.get("User") or ""),
            size=int(info.get("Size") or 0),
            created=int(created) if isinstance(created, int | float) else 0,
        )

    def images(self, labels: list[str], dangling: bool | None = None) -> list[ImageInfo]:
        filters: dict[str, Any] = {"label": labels}
        if dangling is not None:
            filters["dangling"] = dangling
        with translate("list images"):
            found = self.api.images(filters=filters)
        return [
            ImageInfo(
                id=img["Id"],
                tags=tuple(t for t in img.get("RepoTags") or () if t != "<none>:<none>"),
                labels=dict(img.get("Labels") or {}),
                size=int(img.get("Size") or 0),
                created=int(img.get("Created") or 0),
            )
            for img in found
        ]

    def import_image(self, tarball: Path, ref: str, labels: dict[str, str]) -> None:
        repo, _, tag = ref.partition(":")
        changes = [f"LABEL {k}={v}" for k, v in labels.items()]
        with translate(f"import {ref}"):
            self.api.import_image(src=str(tarball), repository=repo, tag=tag or "latest", changes=changes)

    def build_image(
        self, context: dict[str, tuple[bytes, int]], tag: str, labels: dict[str, str], nocache: bool = False
    ) -> Iterator[str]:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, (data, mode) in sorted(context.items()):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), mode, 0
                tar.addfile(info, io.BytesIO(data))
        buf.seek(0)
        with translate(f"build {tag}"):
            for chunk in self.api.build(
                fileobj=buf,
                custom_context=True,
                tag=tag,
                rm=True,
                forcerm=True,
                decode=True,
                nocache=nocache,
                labels=labels,
            ):
                if "error" in chunk:
                    raise EngineError(f"building {tag} failed: {str(chunk['error']).strip()}")
                for line in (chunk.get("stream") or "").splitlines():
                    if line.strip():
                        yield line

    def tag_image(self, ref: str, repository: str, tag: str) -> None:
        with translate(f"tag {ref}"):
            self.api.tag(ref, repository, tag, force=True)

    def remove_image(self, ref: str) -> None:
        with translate(f"remove {ref}"):
            self.api.remove_image(ref)

    # -- volumes ----------------------------------------------------------------------------

    def ensure_volume(self, name: str, device: str, labels: dict[str, str]) -> None:
        if self.volume_labels(name) is not None:
            return
        with translate("create volume"):
            self.api.create_volume(
                name=name, driver="local", driver_opts={"type": "none", "o": "bind", "device": device}, labels=labels
            )

    def volume_labels(self, name: str) -> dict[str, str] | None:
        try:
            with translate("inspect volume"):
                return dict(self.api.inspect_volume(name).get("Labels") or {})
        except EngineError as exc:
            if "no such volume" in str(exc).lower():
                return None
            raise

    def remove_volume(self, name: str) -> bool:
        try:
            with translate("remove volume"):
                self.api.remove_volume(name)
            return True
        except EngineError as exc:
            text = str(exc).lower()
            if "in use" in text:
                raise VolumeBusyError(f"volume {name} is in use by a sandbox") from exc
            if "no such volume" in text or "not found" in text:
                return False
            raise

    def volume_in_use(self, name: str) -> bool:
        with translate("list containers of a volume"):
            return bool(self.api.containers(filters={"volume": name, "status": "running"}, quiet=True))

    def close(self) -> None:
        for pending in list(self._behind.values()):
            pending.join(5)
        self.api.close()
