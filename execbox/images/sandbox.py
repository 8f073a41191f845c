"""Sandbox images, built locally from Debian packages (no registry needed).

Two layers, each tagged by a hash of its recipe so it is rebuilt only when the
recipe changes:

* ``execbox-rootfs:<hash>``: a minimal Debian rootfs (debootstrap, then ``docker import``)
  with the language runtimes;
* ``execbox-sandbox:<hash>``: that rootfs plus the in-sandbox agent and helpers
  (a ``docker build`` on top of the local rootfs image).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..engine.base import Engine
from ..exceptions import EngineError
from .progress import Progress, step

__all__ = ["IMAGE_LABEL", "SANDBOX_DIR", "RootfsRecipe", "build_images", "default_image", "sandbox_files"]

log = logging.getLogger("execbox.images")

IMAGE_LABEL = "execbox.image"
SANDBOX_DIR = "/opt/execbox"


@dataclass(frozen=True)
class RootfsRecipe:
    """What goes into the base rootfs."""

    suite: str = "bookworm"
    variant: str = "minbase"
    packages: tuple[str, ...] = ("python3", "nodejs", "ca-certificates")
    mirror: str = "http://deb.debian.org/debian"

    def digest(self) -> str:
        # The mirror does not change the content, so it is not part of the hash.
        key = json.dumps({"suite": self.suite, "variant": self.variant, "packages": sorted(self.packages)})
        return hashlib.sha256(key.encode()).hexdigest()[:12]

    @property
    def tag(self) -> str:
        return f"execbox-rootfs:{self.digest()}"


def sandbox_files() -> dict[str, bytes]:
    """Files baked into the sandbox image under /opt/execbox (the agent and helpers)."""
    root = resources.files("execbox") / "sandbox"
    out: dict[str, bytes] = {}
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.is_file() and not entry.name.startswith((".", "__")) and entry.name.endswith((".py", ".js")):
            out[entry.name] = entry.read_bytes()
    return out


def _dockerfile(base: str) -> str:
    return (
        f"FROM {base}\n"
        f"COPY files/ {SANDBOX_DIR}/\n"
        # The state helpers, importable as `execbox_state` / `require('execbox-state')`.
        "COPY files/execbox_state.py /usr/lib/python3/dist-packages/execbox_state.py\n"
        "COPY files/execbox-state.js /usr/share/nodejs/execbox-state/index.js\n"
        "ENV PATH=/usr/local/bin:/usr/bin:/bin LANG=C.UTF-8\n"
        "WORKDIR /work\n"
        f'CMD ["python3", "-I", "-S", "{SANDBOX_DIR}/agent.py"]\n'
    )


def _sandbox_digest(rootfs_tag: str, files: dict[str, bytes]) -> str:
    h = hashlib.sha256(_dockerfile(rootfs_tag).encode())
    for name, data in sorted(files.items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()[:12]


def default_image(recipe: RootfsRecipe | None = None) -> str:
    """Tag of the sandbox image for this version of execbox."""
    rootfs = (recipe or RootfsRecipe()).tag
    return f"execbox-sandbox:{_sandbox_digest(rootfs, sandbox_files())}"


def _run(cmd: list[str], progress: Progress) -> None:
    """Run ``cmd``, each line of its output a detail line of ``progress``."""
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail = [*tail[-40:], line]
            progress(line)
    if proc.returncode != 0:
        raise EngineError(f"{cmd[0]} failed (exit {proc.returncode}):\n" + "\n".join(tail)[-2000:])


def build_rootfs(engine: Engine, recipe: RootfsRecipe, progress: Progress) -> str:
    """debootstrap the recipe into a temporary folder and import it as an image."""
    if shutil.which("debootstrap") is None:
        raise EngineError("debootstrap is not installed (apt-get install -y debootstrap)")
    with tempfile.TemporaryDirectory(prefix="execbox-rootfs-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "rootfs"
        step(progress, f"debootstrap {recipe.suite} ({', '.join(recipe.packages)})")
        _run(
            [
                "debootstrap",
                f"--variant={recipe.variant}",
                f"--include={','.join(recipe.packages)}",
                recipe.suite,
                str(root),
                recipe.mirror,
            ],
            progress,
        )
        # Smaller image: package caches and lists are not needed at run time.
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "usr/share/doc", "usr/share/man"):
            shutil.rmtree(root / junk, ignore_errors=True)
        for d in ("work", "opt/execbox"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "work").chmod(0o1777)
        tarball = Path(tmp) / "rootfs.tar"
        step(progress, f"import {recipe.tag}")
        _run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(tarball), "."], progress)
        engine.import_image(tarball, recipe.tag, {IMAGE_LABEL: "rootfs"})
    return recipe.tag


def build_sandbox(engine: Engine, rootfs_tag: str, progress: Progress) -> str:
    files = sandbox_files()
    tag = f"execbox-sandbox:{_sandbox_digest(rootfs_tag, files)}"
    context = {"Dockerfile": (_dockerfile(rootfs_tag).encode(), 0o644)}
    context.update({f"files/{n}": (d, 0o644) for n, d in files.items()})
    step(progress, f"agent layer {tag}")
    for line in engine.build_image(context, tag, {IMAGE_LABEL: "sandbox"}):
        progress(line)
    return tag


def build_images(
    engine: Engine, recipe: RootfsRecipe | None = None, progress: Progress = log.info, force: bool = False
) -> str:
    """Build whatever of the default images is missing; return the sandbox image tag."""
    recipe = recipe or RootfsRecipe()
    exists = engine.image_exists
    if force or not exists(recipe.tag):
        build_rootfs(engine, recipe, progress)
    else:
        progress(f"{recipe.tag} is up to date")
    tag = default_image(recipe)
    if force or not exists(tag):
        build_sandbox(engine, recipe.tag, progress)
    else:
        progress(f"{tag} is up to date")
    return tag
