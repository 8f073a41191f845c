"""Package images on the engine: build a spec, list, remove, prune, and resolve a name.

Tags (see ``execbox.imagespec``):

* ``execbox-spec:<name>--<hash>``: one build of a spec; the hash covers the
  generated Dockerfile, the base image's id and every added file, so a spec is
  rebuilt only when something that goes into it changes;
* ``execbox-spec:<name>``: the build of ``<name>`` made or confirmed last: what
  ``execute(..., image="<name>")`` runs;
* ``execbox-buildtools:<hash>``: the base's rootfs plus Debian's pip and npm, used
  only as the build stage; built once per rootfs.

The build stage's layers stay behind as untagged images labelled with the spec's
name and stage hash: the layer cache that makes rebuilding a spec on a new sandbox
image (a new agent) quick. ``remove_spec`` and ``prune`` remove them with the images.
"""

from __future__ import annotations

import hashlib
import io
import logging
import ssl
import tarfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .engine.base import Engine
from .exceptions import EngineError, ExecboxError, ImageNotFoundError, InvalidRequestError
from .images import IMAGE_LABEL, RootfsRecipe, default_image
from .imagespec import (
    BUILDTOOLS_REPO,
    NAME_MAX,
    NAME_RE,
    SPEC_LABEL,
    SPEC_REPO,
    STAGE_LABEL,
    BuildPlan,
    ImageSpec,
    buildtools_dockerfile,
    render,
    spec_alias,
)

__all__ = [
    "SpecImage",
    "build_spec",
    "ensure_buildtools",
    "host_ca_bundle",
    "list_spec_images",
    "plan_spec",
    "prune_specs",
    "remove_spec",
    "resolve_image_name",
]

log = logging.getLogger("execbox.imagebuild")
Progress = Callable[[str], None]


@contextmanager
def _translated(what: str) -> Iterator[None]:
    """Errors of the docker SDK (and its transport) as execbox errors, without importing docker here."""
    try:
        yield
    except ExecboxError:
        raise
    except Exception as exc:
        if not type(exc).__module__.startswith(("docker", "requests", "urllib3")):
            raise
        message = getattr(exc, "explanation", None) or str(exc)
        if getattr(exc, "status_code", None) == 404:
            raise ImageNotFoundError(f"{what}: {message}") from exc
        raise EngineError(f"{what}: {message}") from exc


def _inspect(api: Any, ref: str) -> dict[str, Any] | None:
    try:
        with _translated(f"inspect image {ref}"):
            info: dict[str, Any] = api.inspect_image(ref)
            return info
    except ImageNotFoundError:
        return None


def host_ca_bundle() -> bytes | None:
    """The CA certificates this host trusts (OpenSSL's default file), or None.

    Handed to pip and npm in the build stage so that builds work where the host's
    TLS is intercepted by a proxy with its own CA; it never reaches the image.
    """
    cafile = ssl.get_default_verify_paths().cafile
    return Path(cafile).read_bytes() if cafile else None


def _docker_build(
    api: Any,
    files: dict[str, tuple[bytes, int]],
    tag: str,
    labels: dict[str, str],
    progress: Progress,
    nocache: bool = False,
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, (data, mode) in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    recent: list[str] = []
    with _translated(f"build {tag}"):
        for chunk in api.build(
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
                tail = "\n".join(recent[-15:])
                raise EngineError(f"building {tag} failed: {chunk['error'].strip()}\n{tail}")
            for line in (chunk.get("stream") or "").splitlines():
                if line.strip():
                    recent = [*recent[-30:], line]
                    progress(line)


def _buildtools_tag(api: Any, builder_base: str) -> str | None:
    info = _inspect(api, builder_base)
    if info is None:
        return None
    key = buildtools_dockerfile(builder_base) + info["Id"]
    return f"{BUILDTOOLS_REPO}:{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_buildtools(api: Any, builder_base: str, progress: Progress = log.info, force: bool = False) -> str:
    """The build tools image on ``builder_base`` (built when missing); its tag."""
    tag = _buildtools_tag(api, builder_base)
    if tag is None:
        raise ImageNotFoundError(f"image {builder_base} is not built (execbox images build)")
    dockerfile = buildtools_dockerfile(builder_base)
    if force or _inspect(api, tag) is None:
        progress(f"building {tag} (pip and npm for build stages, from Debian) ...")
        t0 = time.monotonic()
        _docker_build(api, {"Dockerfile": (dockerfile.encode(), 0o644)}, tag, {IMAGE_LABEL: "buildtools"}, progress)
        progress(f"built {tag} in {time.monotonic() - t0:.0f} s")
    return tag


def _base_ref(api: Any, base: str | None) -> str:
    """The image a spec starts from: the local sandbox image, another spec's build, or a reference."""
    if base is None:
        return default_image()
    if NAME_RE.fullmatch(base):
        info = _inspect(api, spec_alias(base))
        if info is not None:
            versioned = [t for t in info.get("RepoTags") or [] if t.startswith(f"{SPEC_REPO}:{base}--")]
            return versioned[0] if versioned else spec_alias(base)
    return base


def plan_spec(
    api: Any, spec: ImageSpec, ca_bundle: bytes | None = None, progress: Progress = log.info
) -> tuple[str, BuildPlan, str]:
    """Resolve the spec's base (and build tools) and render it: ``(tag, plan, base)``."""
    base = _base_ref(api, spec.base)
    info = _inspect(api, base)
    if info is None:
        hint = "execbox images build" if spec.base is None else f"the base of {spec.origin}"
        raise ImageNotFoundError(f"base image {base} is not built ({hint})")
    buildtools = None
    if spec.needs_build_stage:
        # The default sandbox is its rootfs plus the agent: build on the rootfs, so that
        # a new agent does not invalidate the (cached) pip and npm installs.
        buildtools = ensure_buildtools(api, RootfsRecipe().tag if spec.base is None else base, progress)
    user = str((info.get("Config") or {}).get("User") or "")
    plan = render(spec, base, info["Id"], buildtools, base_user=user, ca_bundle=ca_bundle)
    return spec.tag(plan.digest), plan, base


def build_spec(
    api: Any,
    spec: ImageSpec,
    progress: Progress = log.info,
    force: bool = False,
    ca_bundle: bytes | None = None,
) -> str:
    """Build ``spec`` unless a build of exactly this spec exists; point its name at it; return its tag.

    ``force`` rebuilds without the layer cache (fetching every package again).
    """
    tag, plan, base = plan_spec(api, spec, ca_bundle, progress)
    if force or _inspect(api, tag) is None:
        progress(f"building {tag} on {base} ({spec.summary()}) ...")
        t0 = time.monotonic()
        labels = {
            IMAGE_LABEL: "spec",
            SPEC_LABEL: spec.name,
            STAGE_LABEL: plan.stage,
            "execbox.spec.base": base,
            "execbox.spec.packages": spec.summary(),
            "execbox.spec.description": spec.description,
        }
        files = {**plan.context, **plan.extra, "Dockerfile": (plan.dockerfile.encode(), 0o644)}
        _docker_build(api, files, tag, labels, progress, nocache=force)
        progress(f"built {tag} in {time.monotonic() - t0:.0f} s")
    else:
        progress(f"{tag} is up to date")
    with _translated(f"tag {tag}"):
        api.tag(tag, SPEC_REPO, spec.name, force=True)
        # When the layer cache gave back an image built for another digest (same content),
        # one build keeps one versioned tag.
        for other in api.inspect_image(tag).get("RepoTags") or []:
            if other.startswith(f"{SPEC_REPO}:{spec.name}--") and other != tag:
                api.remove_image(other)
    return tag


@dataclass(frozen=True)
class SpecImage:
    """One build of a spec on the engine."""

    name: str
    tag: str
    id: str
    size: int
    created: int
    current: bool  # ``execbox-spec:<name>`` points at it
    packages: str
    description: str


def list_spec_images(api: Any) -> list[SpecImage]:
    """Every build of every spec, newest first."""
    with _translated("list images"):
        images = api.images(filters={"label": f"{IMAGE_LABEL}=spec"})
    out = []
    for img in images:
        labels = img.get("Labels") or {}
        name = labels.get(SPEC_LABEL, "")
        tags = [t for t in img.get("RepoTags") or [] if t.startswith(f"{SPEC_REPO}:")]
        if not name or not tags:
            continue
        versioned = [t for t in tags if t.startswith(f"{SPEC_REPO}:{name}--")]
        out.append(
            SpecImage(
                name=name,
                tag=(versioned or tags)[0],
                id=img["Id"],
                size=int(img.get("Size") or 0),
                created=int(img.get("Created") or 0),
                current=spec_alias(name) in tags,
                packages=labels.get("execbox.spec.packages", ""),
                description=labels.get("execbox.spec.description", ""),
            )
        )
    return sorted(out, key=lambda s: (s.name, -s.created))


def _remove(api: Any, ref: str, removed: list[str]) -> None:
    with _translated(f"remove {ref}"):
        api.remove_image(ref)
    removed.append(ref)


def _stage_caches(api: Any, name: str | None = None) -> list[dict[str, Any]]:
    label = [f"{IMAGE_LABEL}=build-stage"] + ([f"{SPEC_LABEL}={name}"] if name else [])
    with _translated("list images"):
        images: list[dict[str, Any]] = api.images(filters={"label": label, "dangling": True})
    return images


def remove_spec(api: Any, name: str) -> list[str]:
    """Remove every build of the spec ``name`` and its build-stage cache; what was removed."""
    builds = [s for s in list_spec_images(api) if s.name == name]
    caches = _stage_caches(api, name)
    if not builds and not caches:
        raise InvalidRequestError("image", f"no package image named {name!r} (execbox images ls)")
    removed: list[str] = []
    for build in builds:
        with _translated("inspect"):
            tags = api.inspect_image(build.id).get("RepoTags") or []
        for tag in tags:
            if tag.startswith(f"{SPEC_REPO}:"):
                _remove(api, tag, removed)
    for cache in caches:
        _remove(api, cache["Id"], removed)
    return removed


def prune_specs(api: Any, name: str | None = None) -> list[str]:
    """Remove superseded builds (no longer what their name points at) and unused build-stage caches.

    With ``name``, only those of that spec; without, also the build tools images
    other than the default rootfs's (those of custom bases are rebuilt when needed).
    """
    removed: list[str] = []
    for build in list_spec_images(api):
        if not build.current and name in (None, build.name):
            _remove(api, build.tag, removed)
    with _translated("list images"):
        kept = api.images(filters={"label": f"{IMAGE_LABEL}=spec"})
    stages = {((i.get("Labels") or {}).get(SPEC_LABEL), (i.get("Labels") or {}).get(STAGE_LABEL)) for i in kept}
    for cache in _stage_caches(api, name):
        labels = cache.get("Labels") or {}
        if (labels.get(SPEC_LABEL), labels.get(STAGE_LABEL)) not in stages:
            _remove(api, cache["Id"], removed)
    if name is None:
        keep = _buildtools_tag(api, RootfsRecipe().tag)
        with _translated("list images"):
            tools = api.images(filters={"label": f"{IMAGE_LABEL}=buildtools"})
        for image in tools:
            for tag in image.get("RepoTags") or []:
                if tag.startswith(f"{BUILDTOOLS_REPO}:") and tag != keep:
                    _remove(api, tag, removed)
    return removed


def resolve_image_name(engine: Engine, name: str) -> str:
    """The image a request's ``image`` names: a spec's name -> its current build.

    An image reference (with ``:``, ``/`` or ``@``) is returned as it is; a bare name
    is a package image built from a spec (or else a local image of that name).
    Anything else is an ``InvalidRequestError`` on ``image``, before any container exists.
    """
    if any(c in name for c in ":/@"):
        return name
    if NAME_RE.fullmatch(name) and len(name) <= NAME_MAX:
        alias = spec_alias(name)
        if engine.image_exists(alias):
            return alias
        if engine.image_exists(name):
            return name
        raise InvalidRequestError(
            "image", f"unknown image {name!r}: no package image of that name is built (execbox images ls)"
        )
    raise InvalidRequestError("image", f"{name!r} is neither a package image name nor an image reference")
