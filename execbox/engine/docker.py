"""Docker Engine implementation of ``Engine`` (the only module that imports ``docker``)."""

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
from . import _checkpoints, runsc
from ._docker import DockerChannel, patch_unix_connect, translate
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


class DockerEngine(Engine):
    """Sandboxes as Docker containers, through the Docker Engine API."""

    name = "docker"

    def __init__(self, client: docker.APIClient) -> None:
        patch_unix_connect()
        self.api = client
        self._root: Path | None = None  # the engine's data root, once asked (checkpoint sizes)
        self._forgetting: dict[str, threading.Thread] = {}  # checkpoints being deleted after a restore

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
        # host's) may be seen stopped before dockerd has handled its OOM event: ask again.
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

    def checkpoint(self, sandbox_id: str, name: str) -> None:
        pending = self._forgetting.get(sandbox_id)
        if pending is not None:
            pending.join(30)  # the previous checkpoint of the same name is being deleted
        with translate(f"checkpoint {sandbox_id[:12]}"):
            res = self.api._post_json(
                self.api._url("/containers/{0}/checkpoints", sandbox_id), data={"CheckpointID": name, "Exit": True}
            )
            self.api._raise_for_status(res)
        # The answer comes before dockerd has handled the sandbox's exit: until then it reports the
        # container running and paused (runsc pauses it to save it), and a start is refused ("cannot
        # start a paused container"; seen once in 15 cycles). Return once it has stopped.
        try:
            with translate(f"wait for {sandbox_id[:12]} to stop"):
                self.api.wait(sandbox_id, timeout=30, condition="not-running")
        except requests.exceptions.ReadTimeout:
            log.warning("checkpointed sandbox %s still reported running after 30 s", sandbox_id[:12])
        runsc.delete_stale_task(sandbox_id)  # else the next start does it (see runsc.py)
        path = self.checkpoint_dir(sandbox_id, name)
        if path is not None and path.is_dir():
            _checkpoints.set_aside(path)  # the restore then skips containerd's copy (see _checkpoints.py)

    def checkpoint_size(self, sandbox_id: str, name: str) -> int | None:
        # Docker 20.10 keeps checkpoints in the container's own directory (a custom directory is
        # refused at start: "custom checkpointdir is not supported", moby#37344), so they go with
        # the container. Measurable only where this process sees the engine's data root.
        path = self.checkpoint_dir(sandbox_id, name)
        if path is None or not path.is_dir():
            return None
        return _checkpoints.size(path)

    def checkpoint_dir(self, sandbox_id: str, name: str) -> Path | None:
        """Where checkpoint ``name`` of the sandbox lives (None: the engine's data root is not local)."""
        if self._root is None:
            with translate("engine info"):
                self._root = Path(str(self.api.info().get("DockerRootDir") or "/var/lib/docker"))
        if not (self._root / "containers").is_dir():
            return None
        if len(sandbox_id) < 64:
            with translate(f"inspect {sandbox_id[:12]}"):
                sandbox_id = str(self.api.inspect_container(sandbox_id)["Id"])
        return self._root / "containers" / sandbox_id / "checkpoints" / name

    def restore(self, sandbox_id: str, name: str, *, attach: bool = False) -> Channel | None:
        # runsc 20221219 leaves a restored container that was checkpointed again recorded as
        # "paused": its next restore would fail with "id already in use" (see runsc.py). Clear
        # that record first. Two containerd races remain, both gone within moments: right after
        # a checkpoint it may still hold the stopped task ("id already in use" too), and a
        # retried upload of the same checkpoint blob may meet the previous attempt's copy not yet
        # deleted ("commit failed: content sha256:...: already exists", moby#42900). Retry those
        # with a growing pause. dockerd ends the streams attached to a start that failed: each
        # try gets its own.
        runsc.clear_stale_state(sandbox_id)
        deadline = time.monotonic() + 20.0
        pause = 0.05
        while True:
            channel = self.attach(sandbox_id) if attach else None
            try:
                with translate(f"restore {sandbox_id[:12]}"):
                    res = self.api._post(
                        self.api._url("/containers/{0}/start", sandbox_id), params={"checkpoint": name}
                    )
                    self.api._raise_for_status(res)
                break
            except BaseException as exc:
                if channel is not None:
                    channel.close()
                if not isinstance(exc, EngineError) or not _checkpoints.transient_restore_error(str(exc)):
                    raise
                if time.monotonic() > deadline:
                    raise
                log.info("restore of %s retried: %s", sandbox_id[:12], exc)
                if not runsc.clear_stale_state(sandbox_id):
                    time.sleep(pause)
                    pause = min(pause * 2, 1.0)
        # Forget the checkpoint off the resume's path (measured: p50 5 ms, but up to 250 ms under
        # load); a later checkpoint of the sandbox waits for it. Left undone, it goes with the container.
        forget = threading.Thread(
            target=self._forget_checkpoint, args=(sandbox_id, name), name="execbox-forget-checkpoint", daemon=True
        )
        self._forgetting[sandbox_id] = forget
        forget.start()
        return channel

    def _forget_checkpoint(self, sandbox_id: str, name: str) -> None:
        try:
            with translate(f"delete checkpoint of {sandbox_id[:12]}"):
                res = self.api._delete(self.api._url("/containers/{0}/checkpoints/{1}", sandbox_id, name))
                self.api._raise_for_status(res)
        except EngineError as exc:  # it goes with the container
            log.warning("checkpoint %s of %s kept: %s", name, sandbox_id[:12], exc)
        else:
            path = self.checkpoint_dir(sandbox_id, name)
            if path is not None:
                _checkpoints.forget(path)
        finally:
            if self._forgetting.get(sandbox_id) is threading.current_thread():
                self._forgetting.pop(sandbox_id, None)

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
        for pending in list(self._forgetting.values()):
            pending.join(5)
        self.api.close()
