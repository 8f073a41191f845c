"""Package image specs: what goes into a sandbox image with packages, and its Dockerfile.

A spec is a small TOML file (or the same as ``execbox images build`` flags)::

    name = "data"                       # default: the file name without .toml
    description = "numpy and pandas"
    # base = "execbox-sandbox:<hash>"   # default: the local sandbox image
    apt = ["jq"]                        # Debian packages (name or name=version)
    pip = ["numpy==2.4.6"]              # PyPI, pinned with ==
    npm = ["lodash@4.17.21"]            # npm registry, pinned to an exact version
    [files]
    "/opt/data/cities.csv" = "cities.csv"   # path in the image = file or folder, relative to the spec

``render`` turns it into a two-stage Dockerfile. The first stage starts from the
build tools image (the base's rootfs plus Debian's pip and npm) and installs the
pip packages under ``/staging/usr/local`` and the npm packages in
``/staging/node_modules``, as root. The final stage starts from the base, installs
the apt packages, copies ``/staging`` to ``/`` and adds the files; nothing else
changes, so the image keeps the agent command, and sandboxes still run it as a
random non-root UID on a read-only root. ``/node_modules`` is found by
``require()`` and ``import`` from any folder; pip's packages land in
``/usr/local/lib/python3.X/dist-packages``, which is on ``sys.path``.

Nothing here talks to the engine: ``execbox.imagebuild`` builds what this renders.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import re
import shlex
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..exceptions import InvalidRequestError

__all__ = ["BuildPlan", "FileEntry", "ImageSpec", "buildtools_dockerfile", "render", "spec_alias"]

SPEC_REPO = "execbox-spec"
BUILDTOOLS_REPO = "execbox-buildtools"
SPEC_LABEL = "execbox.spec"
STAGE_LABEL = "execbox.spec.stage"
STAGING = "/staging"
BUILD_CA = "/etc/execbox-build-ca.pem"
MANIFEST_DIR = "/usr/local/share/execbox-spec"

# Lower case, digits and single separators: valid as a Docker tag, never containing
# "--", which separates the name from the digest in the versioned tag.
NAME_RE = re.compile(r"[a-z0-9]+(?:[._-][a-z0-9]+)*")
NAME_MAX = 40
_APT_RE = re.compile(r"[a-z0-9][a-z0-9+.-]*(?:=[A-Za-z0-9.+:~-]+)?")
_PIP_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?(?:\[[A-Za-z0-9._,-]+\])?==[A-Za-z0-9.+!_-]+")
_NPM_RE = re.compile(
    r"(?:@[a-z0-9][a-z0-9._~-]*/)?[a-z0-9][a-z0-9._~-]*@\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?"
)
# Mounted over at run time, the agent's own folder, or where npm packages go.
_RESERVED = (
    "/work",
    "/tmp",
    "/proc",
    "/sys",
    "/dev",
    "/opt/execbox",
    "/node_modules",
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
)
_KEYS = ("name", "description", "base", "apt", "pip", "npm", "files")


def spec_alias(name: str) -> str:
    """The tag that always names the most recent build of the spec ``name``."""
    return f"{SPEC_REPO}:{name}"


@dataclass(frozen=True)
class FileEntry:
    """A file or folder from the host, added to the image at ``dest`` (readable by anyone)."""

    dest: str
    source: Path


@dataclass(frozen=True)
class ImageSpec:
    """A package image: a base image plus apt, pip and npm packages and files.

    Validated on construction; errors are ``InvalidRequestError`` naming the key
    (``spec.pip``, ...) and where the spec came from.
    """

    name: str
    description: str = ""
    base: str | None = None
    apt: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()
    npm: tuple[str, ...] = ()
    files: tuple[FileEntry, ...] = ()
    origin: str = "<command line>"

    def __post_init__(self) -> None:
        def bad(key: str, message: str) -> InvalidRequestError:
            return InvalidRequestError(f"spec.{key}", f"{self.origin}: {message}")

        if not NAME_RE.fullmatch(self.name) or len(self.name) > NAME_MAX:
            raise bad(
                "name",
                f"{self.name!r} is not a valid image name (lower-case letters and digits, "
                f"single '.', '_' or '-' between them, at most {NAME_MAX} characters)",
            )
        if self.base is not None and (not self.base or any(c.isspace() for c in self.base)):
            raise bad("base", f"{self.base!r} is not an image reference")
        checks = (
            ("apt", self.apt, _APT_RE, "a Debian package name, optionally name=version"),
            ("pip", self.pip, _PIP_RE, "pinned: name==version (extras allowed: name[extra]==version)"),
            ("npm", self.npm, _NPM_RE, "pinned to an exact version: name@1.2.3 (or @scope/name@1.2.3)"),
        )
        for key, items, pattern, expected in checks:
            for item in items:
                if not isinstance(item, str) or not pattern.fullmatch(item):
                    raise bad(key, f"{item!r} is not {expected}")
            names = [_package_name(key, item) for item in items]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise bad(key, f"listed more than once: {', '.join(dupes)}")
        seen: set[str] = set()
        for entry in self.files:
            dest = entry.dest
            if not dest.startswith("/") or posixpath.normpath(dest) != dest or dest == "/" or "\\" in dest:
                raise bad("files", f"{dest!r}: the path in the image must be absolute and normalized")
            if any(dest == r or dest.startswith(r + "/") for r in _RESERVED):
                raise bad("files", f"{dest!r}: {', '.join(_RESERVED)} are reserved (mounted over, or execbox's own)")
            if any(c.isspace() or c in "\"'$`*?[]{}" for c in dest):
                raise bad("files", f"{dest!r}: spaces, quotes and wildcards are not supported in image paths")
            if dest in seen:
                raise bad("files", f"{dest!r} is listed more than once")
            seen.add(dest)
            if not (entry.source.is_file() or entry.source.is_dir()):
                raise bad("files", f"{dest!r}: the source {str(entry.source)!r} is not a file or folder")

    # -- constructors -------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ImageSpec:
        """Read a spec file (TOML); relative file sources are relative to its folder."""
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text())
        except OSError as exc:
            raise InvalidRequestError("spec", f"cannot read {p}: {exc.strerror}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise InvalidRequestError("spec", f"{p}: not valid TOML: {exc}") from None
        return cls.from_mapping(data, root=p.parent, origin=str(p), default_name=p.stem)

    @classmethod
    def from_mapping(
        cls, data: Mapping[str, Any], root: Path, origin: str = "<spec>", default_name: str | None = None
    ) -> ImageSpec:
        """A spec from a parsed mapping (the TOML keys); file sources relative to ``root``."""
        unknown = sorted(set(data) - set(_KEYS))
        if unknown:
            raise InvalidRequestError("spec", f"{origin}: unknown keys {unknown}; known: {', '.join(_KEYS)}")

        def strings(key: str) -> tuple[str, ...]:
            value = data.get(key, [])
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidRequestError(f"spec.{key}", f"{origin}: must be a list of strings")
            return tuple(value)

        def text(key: str, default: str | None) -> str | None:
            value = data.get(key, default)
            if value is not None and not isinstance(value, str):
                raise InvalidRequestError(f"spec.{key}", f"{origin}: must be a string")
            return value

        files = data.get("files", {})
        if not isinstance(files, Mapping) or not all(isinstance(v, str) for v in files.values()):
            raise InvalidRequestError("spec.files", f'{origin}: must be a table of "/path/in/image" = "source"')
        name = text("name", default_name)
        if name is None:
            raise InvalidRequestError("spec.name", f"{origin}: a name is required")
        return cls(
            name=name,
            description=text("description", "") or "",
            base=text("base", None),
            apt=strings("apt"),
            pip=strings("pip"),
            npm=strings("npm"),
            files=tuple(FileEntry(dest, (root / src).resolve()) for dest, src in files.items()),
            origin=origin,
        )

    # -- derived --------------------------------------------------------------------------

    @property
    def alias(self) -> str:
        return spec_alias(self.name)

    def tag(self, digest: str) -> str:
        """The versioned tag: the name and a hash of everything that goes into the image."""
        return f"{SPEC_REPO}:{self.name}--{digest[:12]}"

    @property
    def needs_build_stage(self) -> bool:
        return bool(self.pip or self.npm)

    def summary(self) -> str:
        kinds = (("apt", self.apt), ("pip", self.pip), ("npm", self.npm))
        parts = [f"{key}: {' '.join(items)}" for key, items in kinds if items]
        parts += [f"files: {len(self.files)}"] if self.files else []
        return "; ".join(parts) or "no packages"


def _package_name(kind: str, item: str) -> str:
    if kind == "npm":
        return item.rsplit("@", 1)[0]
    if kind == "pip":
        return re.sub(r"[-_.]+", "-", re.split(r"[\[=]", item, maxsplit=1)[0]).lower()
    return item.split("=", 1)[0]


@dataclass(frozen=True)
class BuildPlan:
    """A rendered spec: the Dockerfile, its build context and the hashes that name it."""

    dockerfile: str
    context: dict[str, tuple[bytes, int]]  # path in the context -> (content, mode)
    digest: str  # everything that goes into the image: the versioned tag
    stage: str  # the build stage alone: labels its cache
    extra: dict[str, tuple[bytes, int]] = field(default_factory=dict)  # in the context, not in the digest


def buildtools_dockerfile(builder_base: str) -> str:
    """The build tools image: the base's rootfs plus Debian's pip and npm (used in build stages only)."""
    return (
        f"FROM {builder_base}\n"
        "RUN apt-get update -qq \\\n"
        " && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-pip npm \\\n"
        " && apt-get clean && rm -rf /var/lib/apt/lists/*\n"
    )


def _context_files(spec: ImageSpec) -> tuple[dict[str, tuple[bytes, int]], list[tuple[str, FileEntry]]]:
    """Every file source under ``files/<i>`` in the context; modes normalized to 0644/0755."""
    out: dict[str, tuple[bytes, int]] = {}
    copies: list[tuple[str, FileEntry]] = []
    for i, entry in enumerate(spec.files):
        prefix = f"files/{i}"
        if entry.source.is_file():
            out[prefix] = (entry.source.read_bytes(), _mode(entry.source))
        else:
            for dirpath, dirnames, filenames in os.walk(entry.source):
                for d in dirnames:
                    if (Path(dirpath) / d).is_symlink():
                        raise InvalidRequestError(
                            "spec.files", f"{spec.origin}: {Path(dirpath) / d}: symlinked folders are not supported"
                        )
                dirnames.sort()
                rel = Path(dirpath).relative_to(entry.source)
                for name in sorted(filenames):
                    src = Path(dirpath) / name
                    out[f"{prefix}/{(rel / name).as_posix()}"] = (src.read_bytes(), _mode(src))
            if not any(k.startswith(prefix + "/") for k in out):
                raise InvalidRequestError("spec.files", f"{spec.origin}: {entry.source} is an empty folder")
            prefix += "/"
        copies.append((prefix, entry))
    return out, copies


def _mode(path: Path) -> int:
    return 0o755 if os.stat(path).st_mode & 0o111 else 0o644


def _q(items: tuple[str, ...]) -> str:
    return " ".join(shlex.quote(i) for i in items)


def render(
    spec: ImageSpec,
    base: str,
    base_id: str,
    buildtools: str | None,
    base_user: str = "",
    ca_bundle: bytes | None = None,
) -> BuildPlan:
    """The Dockerfile and context of ``spec`` on ``base`` (an image whose id is ``base_id``).

    ``buildtools`` is the build tools image (needed when there are pip or npm
    packages); ``ca_bundle`` is trusted by pip and npm in the build stage only
    (for builds behind a TLS-intercepting proxy); it never reaches the image.
    """
    context, copies = _context_files(spec)
    extra: dict[str, tuple[bytes, int]] = {}
    lines = [f"# execbox package image {spec.name!r}, generated from its spec"]
    stage = ""
    ca_lines: list[str] = []
    if spec.needs_build_stage:
        if buildtools is None:
            raise ValueError("a spec with pip or npm packages needs the build tools image")
        body: list[str] = []
        if spec.pip:
            body.append(
                "RUN python3 -m pip install --no-cache-dir --no-input --disable-pip-version-check"
                " --break-system-packages --ignore-installed --no-warn-script-location \\\n"
                f"    --root {STAGING} {_q(spec.pip)} \\\n"
                f" && mkdir -p {STAGING}{MANIFEST_DIR} \\\n"
                f" && python3 -m pip list --format=freeze --path {STAGING}/usr/local/lib/python3*/dist-packages"
                f" > {STAGING}{MANIFEST_DIR}/pip-freeze.txt"
            )
        if spec.npm:
            body.append(
                f"RUN mkdir -p /npm {STAGING}{MANIFEST_DIR} && cd /npm \\\n"
                " && echo '{\"private\": true}' > package.json \\\n"
                f" && npm install --no-audit --no-fund --no-update-notifier --cache /tmp/npm-cache {_q(spec.npm)} \\\n"
                f" && mv node_modules {STAGING}/node_modules && cp package-lock.json {STAGING}{MANIFEST_DIR}/ \\\n"
                " && rm -rf /tmp/npm-cache"
            )
        # Packages are read by whatever UID the sandbox gets, and written by none.
        body.append(f"RUN chmod -R a+rX,go-w {STAGING}")
        stage = hashlib.sha256("\n".join([buildtools, *body]).encode()).hexdigest()[:12]
        lines += [
            f"FROM {buildtools} AS build",
            f"LABEL execbox.image=build-stage {SPEC_LABEL}={spec.name} {STAGE_LABEL}={stage}",
        ]
        if ca_bundle is not None:
            extra["build-ca.pem"] = (ca_bundle, 0o644)
            ca_lines = [
                f"COPY build-ca.pem {BUILD_CA}",
                f"ENV PIP_CERT={BUILD_CA} NPM_CONFIG_CAFILE={BUILD_CA} NODE_EXTRA_CA_CERTS={BUILD_CA}",
            ]
            lines += ca_lines
        lines += body
        lines.append("")
    lines.append(f"FROM {base}")
    if base_user not in ("", "root", "0", "0:0"):
        lines.append("USER root")
    if spec.apt:
        lines.append(
            "RUN apt-get update -qq \\\n"
            f" && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends {_q(spec.apt)} \\\n"
            " && apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin"
        )
    if spec.needs_build_stage:
        lines.append(f"COPY --from=build {STAGING}/ /")
    for prefix, entry in copies:
        lines.append(f"COPY {prefix} {entry.dest}{'/' if prefix.endswith('/') else ''}")
    if base_user not in ("", "root", "0", "0:0"):
        lines.append(f"USER {base_user}")
    dockerfile = "\n".join(lines) + "\n"
    # The description is a label of the image: part of what the tag stands for. How the
    # build reaches the registries (the CA) is not.
    hashed = [line for line in lines if line not in ca_lines]
    h = hashlib.sha256(json.dumps([hashed, base_id, spec.description]).encode())
    for name, (data, mode) in sorted(context.items()):
        h.update(f"\0{name}\0{mode:o}\0".encode() + hashlib.sha256(data).digest())
    return BuildPlan(dockerfile, context, h.hexdigest(), stage, extra)
