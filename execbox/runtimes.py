"""Language runtimes: adding a language is one entry in ``RUNTIMES``."""

from __future__ import annotations

from dataclasses import dataclass, field

from .exceptions import InvalidRequestError

__all__ = ["RUNTIMES", "Runtime", "get_runtime"]

WORKDIR = "/work"  # the program's working directory (a tmpfs) and HOME

BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin",
    "HOME": WORKDIR,
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
    # A bootstrap that starts the runtime before the request and then runs the
    # program as its main module (see execbox/sandbox/warm_*); None: always cold.
    warm_argv: tuple[str, ...] | None = None
    # Variables read only at interpreter start-up: when the caller sets one, the
    # program is started cold so that it takes effect.
    startup_env_prefixes: tuple[str, ...] = ()
    # Loaded by a warm runtime on an egress network before the request: what the egress
    # preload and ordinary HTTP(S) clients need, paid off the run's clock.
    network_prime: tuple[str, ...] = ()

    def warm_ok(self, user_env: dict[str, str]) -> bool:
        """Whether a pre-started runtime can run a program with ``user_env``."""
        return self.warm_argv is not None and not any(k.startswith(self.startup_env_prefixes) for k in user_env)

    def environment(self, user_env: dict[str, str]) -> dict[str, str]:
        """The program's whole environment: base, runtime, then the caller's values."""
        return {**BASE_ENV, **self.env, **user_env}


RUNTIMES: tuple[Runtime, ...] = (
    Runtime(
        "javascript",
        "main.js",
        ("node", "main.js"),
        aliases=("js", "node", "nodejs"),
        warm_argv=("node", "/opt/execbox/warm_node.js"),
        startup_env_prefixes=("NODE_", "UV_"),
        network_prime=("net", "tls", "http", "https", "fetch"),
    ),
    Runtime(
        "python",
        "main.py",
        ("python3", "main.py"),
        aliases=("py", "python3"),
        env={"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"},
        warm_argv=("python3", "/opt/execbox/warm_python.py"),
        startup_env_prefixes=("PYTHON",),
        network_prime=("base64", "socket", "ssl", "urllib.parse", "http.client", "urllib.request", "json"),
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
