"""Engines are opened from a URL; nothing above execbox/engine/ names an implementation."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from execbox.engine import open_engine
from execbox.engine.local import LocalEngine
from execbox.exceptions import ConfigurationError

PACKAGE = Path(__file__).resolve().parent.parent / "execbox"


def test_local_and_bad_urls() -> None:
    assert isinstance(open_engine("local:"), LocalEngine)
    for bad in ("http://x", "kubernetes:", "docker:ftp://x"):
        with pytest.raises(ConfigurationError, match="engine URL"):
            open_engine(bad)


@pytest.mark.docker
def test_docker_urls_reach_the_same_engine(engine: object) -> None:
    for url in (
        None,
        "docker:",
        "unix:///var/run/docker.sock",
        "/var/run/docker.sock",
        "docker:unix:///var/run/docker.sock",
    ):
        eng = open_engine(url)
        try:
            eng.ping()
        finally:
            eng.close()


def test_nothing_outside_the_engine_package_touches_docker() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(("engine/", "sandbox/")):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if any(n == "docker" or n.startswith("docker.") or n.endswith("engine.docker") for n in names):
                    offenders.append(f"{rel}: imports {names}")
            if isinstance(node, ast.Attribute) and node.attr == "api":
                offenders.append(f"{rel}:{node.lineno}: .api")
            if isinstance(node, ast.Name) and node.id in ("DockerEngine", "DockerChannel"):
                offenders.append(f"{rel}:{node.lineno}: {node.id}")
    assert offenders == []
