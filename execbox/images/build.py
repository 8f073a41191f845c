"""Package images on the engine: build a spec, list, remove, prune, and resolve a name.

Tags (see ``execbox.images.spec``):

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
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from ..engine.base import Engine, ImageInfo
from ..exceptions import EngineError, ImageNotFoundError, InvalidRequestError
from .progress import Progress, step
from .sandbox import IMAGE_LABEL, RootfsRecipe, default_image
from .spec import (
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

log = logging.getLogger("execbox.images.build")


def host_ca_bundle() -> bytes | None:
    """The CA certificates this host trusts (OpenSSL's default file), or None.

    Handed to pip and npm in the build stage so that builds work where the host's
    TLS is intercepted by a proxy with its own CA; it never reaches the image.
    """
    cafile = ssl.get_default_verify_paths().cafile
    return Path(cafile).read_bytes() if cafile else None


def _build(
    engine: Engine,
    files: dict[str, tuple[bytes, int]],
    tag: str,
    labels: dict[str, str],
    progress: Progress,
    nocache: bool = False,
) -> None:
    recent: list[str] = []
    try:
        for line in engine.build_image(files, tag, labels, nocache=nocache):
            recent = [*recent[-30:], line]
            progress(line)
    except EngineError as exc:
        tail = "\n".join(recent[-15:])
        raise EngineError(f"{exc}\n{tail}") from exc


def _buildtools_tag(engine: Engine, builder_base: str) -> str | None:
    info = engine.image_info(builder_base)
    if info is None:
        return None
    key = buildtools_dockerfile(builder_base) + info.id
    return f"{BUILDTOOLS_REPO}:{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_buildtools(engine: Engine, builder_base: str, progress: Progress = log.info, force: bool = False) -> str:
    """The build tools image on ``builder_base`` (built when missing); its tag."""
    tag = _buildtools_tag(engine, builder_base)
    if tag is None:
        raise ImageNotFoundError(f"image {builder_base} is not built (execbox images build)")
    dockerfile = buildtools_dockerfile(builder_base)
    if force or engine.image_info(tag) is None:
        step(progress, f"build tools {tag} (pip and npm for build stages, from Debian)")
        t0 = time.monotonic()
        _build(engine, {"Dockerfile": (dockerfile.encode(), 0o644)}, tag, {IMAGE_LABEL: "buildtools"}, progress)
        progress(f"built {tag} in {time.monotonic() - t0:.0f} s")
    return tag


def _base_ref(engine: Engine, base: str | None) -> str:
    """The image a spec starts from: the local sandbox image, another spec's build, or a reference."""
    if base is None:
        return default_image()
    if NAME_RE.fullmatch(base):
        info = engine.image_info(spec_alias(base))
        if info is not None:
            versioned = [t for t in info.tags if t.startswith(f"{SPEC_REPO}:{base}--")]
            return versioned[0] if versioned else spec_alias(base)
    return base


def plan_spec(
    engine: Engine, spec: ImageSpec, ca_bundle: bytes | None = None, progress: Progress = log.info
) -> tuple[str, BuildPlan, str]:
    """Resolve the spec's base (and build tools) and render it: ``(tag, plan, base)``."""
    base = _base_ref(engine, spec.base)
    info = engine.image_info(base)
    if info is None:
        hint = "execbox images build" if spec.base is None else f"the base of {spec.origin}"
        raise ImageNotFoundError(f"base image {base} is not built ({hint})")
    buildtools = None
    if spec.needs_build_stage:
        # The default sandbox is its rootfs plus the agent: build on the rootfs, so that
        # a new agent does not invalidate the (cached) pip and npm installs.
        buildtools = ensure_buildtools(engine, RootfsRecipe().tag if spec.base is None else base, progress)
    plan = render(spec, base, info.id, buildtools, base_user=info.user, ca_bundle=ca_bundle)
    return spec.tag(plan.digest), plan, base


def build_spec(
    engine: Engine,
    spec: ImageSpec,
    progress: Progress = log.info,
    force: bool = False,
    ca_bundle: bytes | None = None,
) -> str:
    """Build ``spec`` unless a build of exactly this spec exists; point its name at it; return its tag.

    ``force`` rebuilds without the layer cache (fetching every package again).
    """
    tag, plan, base = plan_spec(engine, spec, ca_bundle, progress)
    if force or engine.image_info(tag) is None:
        step(progress, f"package image {spec.name!r}: {tag} on {base} ({spec.summary()})")
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
        _build(engine, files, tag, labels, progress, nocache=force)
        progress(f"built {tag} in {time.monotonic() - t0:.0f} s")
    else:
        progress(f"{tag} is up to date")
    engine.tag_image(tag, SPEC_REPO, spec.name)
    # When the layer cache gave back an image built for another digest (same content),
    # one build keeps one versioned tag.
    built = engine.image_info(tag)
    for other in built.tags if built is not None else ():
        if other.startswith(f"{SPEC_REPO}:{spec.name}--") and other != tag:
            engine.remove_image(other)
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


def list_spec_images(engine: Engine) -> list[SpecImage]:
    """Every build of every spec, newest first."""
    out = []
    for img in engine.images([f"{IMAGE_LABEL}=spec"]):
        labels = img.labels
        name = labels.get(SPEC_LABEL, "")
        tags = [t for t in img.tags if t.startswith(f"{SPEC_REPO}:")]
        if not name or not tags:
            continue
        versioned = [t for t in tags if t.startswith(f"{SPEC_REPO}:{name}--")]
        out.append(
            SpecImage(
                name=name,
                tag=(versioned or tags)[0],
                id=img.id,
                size=img.size,
                created=img.created,
                current=spec_alias(name) in tags,
                packages=labels.get("execbox.spec.packages", ""),
                description=labels.get("execbox.spec.description", ""),
            )
        )
    return sorted(out, key=lambda s: (s.name, -s.created))


def _remove(engine: Engine, ref: str, removed: list[str]) -> None:
    engine.remove_image(ref)
    removed.append(ref)


def _stage_caches(engine: Engine, name: str | None = None) -> list[ImageInfo]:
    label = [f"{IMAGE_LABEL}=build-stage"] + ([f"{SPEC_LABEL}={name}"] if name else [])
    return engine.images(label, dangling=True)


def remove_spec(engine: Engine, name: str) -> list[str]:
    """Remove every build of the spec ``name`` and its build-stage cache; what was removed."""
    builds = [s for s in list_spec_images(engine) if s.name == name]
    caches = _stage_caches(engine, name)
    if not builds and not caches:
        raise InvalidRequestError("image", f"no package image named {name!r} (execbox images ls)")
    removed: list[str] = []
    for build in builds:
        info = engine.image_info(build.id)
        for tag in info.tags if info is not None else ():
            if tag.startswith(f"{SPEC_REPO}:"):
                _remove(engine, tag, removed)
    for cache in caches:
        _remove(engine, cache.id, removed)
    return removed


def prune_specs(engine: Engine, name: str | None = None) -> list[str]:
    """Remove superseded builds (no longer what their name points at) and unused build-stage caches.

    With ``name``, only those of that spec; without, also the build tools images
    other than the default rootfs's (those of custom bases are rebuilt when needed).
    """
    removed: list[str] = []
    for build in list_spec_images(engine):
        if not build.current and name in (None, build.name):
            _remove(engine, build.tag, removed)
    kept = engine.images([f"{IMAGE_LABEL}=spec"])
    stages = {(i.labels.get(SPEC_LABEL), i.labels.get(STAGE_LABEL)) for i in kept}
    for cache in _stage_caches(engine, name):
        if (cache.labels.get(SPEC_LABEL), cache.labels.get(STAGE_LABEL)) not in stages:
            _remove(engine, cache.id, removed)
    if name is None:
        keep = _buildtools_tag(engine, RootfsRecipe().tag)
        for image in engine.images([f"{IMAGE_LABEL}=buildtools"]):
            for tag in image.tags:
                if tag.startswith(f"{BUILDTOOLS_REPO}:") and tag != keep:
                    _remove(engine, tag, removed)
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
