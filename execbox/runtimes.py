"""Language runtimes: adding a language is one entry in ``RUNTIMES``."""

from __future__ import annotations

from dataclasses import dataclass, field

from .exceptions import InvalidRequestError

__all__ = ["RUNTIMES", "Runtime", "get_runtime"]

BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": "/work",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
}


@dataclass(frozen=True)
class Runtime:
    """How one language runs: the file the code is written to and the command."""

    name: str
    filename: str
    argv: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    def environment(self, user_env: dict[str, str]) -> dict[str, str]:
        """The program's whole environment: base, runtime, then the caller's values."""
        return {**BASE_ENV, **self.env, **user_env}


RUNTIMES: tuple[Runtime, ...] = (
    Runtime("javascript", "main.js", ("node", "main.js"), aliases=("js", "node", "nodejs")),
    Runtime(
        "python",
        "main.py",
        ("python3", "main.py"),
        aliases=("py", "python3"),
        env={"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"},
    ),
    Runtime("bash", "main.sh", ("bash", "main.sh"), aliases=("sh", "shell")),
)

_BY_NAME = {alias: rt for rt in RUNTIMES for alias in (rt.name, *rt.aliases)}


def get_runtime(language: str) -> Runtime:
    """The runtime for ``language`` (a name or an alias), or InvalidRequestError."""
    try:
        return _BY_NAME[language.lower()]
    except KeyError:
        known = ", ".join(rt.name for rt in RUNTIMES)
        raise InvalidRequestError("language", f"unknown language {language!r}; known: {known}") from None
