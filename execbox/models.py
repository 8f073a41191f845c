"""Pydantic models shared by the library, the service and the client."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any

import pydantic
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, field_validator

from .egress.models import NetworkLogEntry, Secret
from .egress.policy import NetworkPolicy
from .engine.base import ISOLATIONS, Isolation
from .exceptions import InvalidRequestError

__all__ = [
    "ExecutionRequest",
    "ExecutionResult",
    "Limits",
    "RunResult",
    "check_isolation",
    "invalid_request",
    "parse_size",
    "resolve_limits",
]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def parse_size(value: Any) -> int:
    """Turn ``"256m"``, ``"1GiB"``, ``"64k"`` or an int into a byte count (binary units)."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string such as '256m'")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    raise ValueError(f"invalid size {value!r}: use bytes or a string such as '256m', '1g'")


Size = Annotated[int, BeforeValidator(parse_size)]


def _b64_in(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("file content must be base64") from None
    raise ValueError("file content must be base64 text or bytes")


# Bytes in Python, base64 in JSON (the API); a str given to the model is base64.
FileBytes = Annotated[
    bytes, BeforeValidator(_b64_in), PlainSerializer(lambda b: base64.b64encode(b).decode(), return_type=str)
]
MAX_COLLECT_PATTERNS = 32


def check_isolation(value: str) -> Isolation:
    """``value`` as an isolation, or InvalidRequestError naming ``isolation``."""
    if value not in ISOLATIONS:
        raise InvalidRequestError("isolation", f"unknown isolation {value!r}: use {' or '.join(ISOLATIONS)}")
    return value


def check_code(code: str) -> str:
    """Program text that is not blank and has no NUL byte."""
    if not code.strip():
        raise ValueError("code is empty")
    if "\0" in code:
        raise ValueError("code contains a NUL byte")
    return code


def check_env(env: dict[str, str]) -> dict[str, str]:
    """POSIX variable names, values without NUL bytes."""
    for name, value in env.items():
        if not ENV_NAME_RE.match(name):
            raise ValueError(f"invalid environment variable name {name!r}: use letters, digits and _")
        if "\0" in value:
            raise ValueError(f"environment variable {name} contains a NUL byte")
    return env


def check_rel_path(path: str, what: str = "path") -> str:
    """A relative path that stays inside the working directory."""
    parts = path.split("/")
    if not path or path.startswith("/") or any(p in ("", ".", "..") for p in parts) or "\0" in path:
        raise ValueError(f"invalid {what} {path!r}: use a relative path without '..'")
    return path


class Limits(BaseModel):
    """Resource limits of one run. Every field has a safe default; sizes accept '256m'."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout: float = Field(10.0, gt=0, description="Wall-clock limit in seconds; the code is killed after it.")
    memory: Size = Field(256 << 20, ge=16 << 20, description="Memory limit in bytes (swap is the same: none extra).")
    cpus: float = Field(1.0, gt=0, description="CPU cores the run may use.")
    pids: int = Field(128, ge=8, description="Maximum number of processes and threads.")
    output_bytes: Size = Field(1 << 20, ge=1, description="Cap per output stream; the excess is dropped.")
    disk: Size = Field(64 << 20, ge=1 << 20, description="Size of each writable tmpfs (/work and /tmp).")
    inodes: int = Field(16384, ge=64, description="Inode cap of each writable tmpfs.")

    def merged(self, overrides: Limits | dict[str, Any] | None) -> Limits:
        """These limits with the fields set in ``overrides`` replaced."""
        if overrides is None:
            return self
        if isinstance(overrides, dict):
            overrides = Limits.model_validate(overrides)
        return self.model_copy(update={k: getattr(overrides, k) for k in overrides.model_fields_set})

    def exceeding(self, maximum: Limits) -> list[str]:
        """Names of the fields above ``maximum``."""
        return [name for name in Limits.model_fields if getattr(self, name) > getattr(maximum, name)]


def invalid_request(exc: pydantic.ValidationError, prefix: str = "", default: str = "request") -> InvalidRequestError:
    """A pydantic validation error as an ``InvalidRequestError`` naming the (first) field."""
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first.get("loc", ())) or default
    msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return InvalidRequestError(prefix + field, msg)


def resolve_limits(
    defaults: Limits,
    maximum: Limits,
    requested: Limits | dict[str, Any] | None,
    timeout: float | None = None,
    whose: str = "the maximum",
) -> Limits:
    """``requested`` (and a ``timeout`` given on its own) over ``defaults``, checked against
    ``maximum``; InvalidRequestError naming ``limits.<field>`` (or ``timeout``) otherwise."""
    try:
        limits = defaults.merged(requested)
    except pydantic.ValidationError as exc:
        raise invalid_request(exc, prefix="limits.") from None
    if timeout is not None:
        limits = limits.model_copy(update={"timeout": timeout})
    for name in limits.exceeding(maximum):
        field = "timeout" if name == "timeout" and timeout is not None else f"limits.{name}"
        raise InvalidRequestError(field, f"{getattr(limits, name)} exceeds {whose} {getattr(maximum, name)}")
    return limits


DEFAULT_MAX_LIMITS = Limits(
    timeout=300, memory=4 << 30, cpus=4.0, pids=1024, output_bytes=64 << 20, disk=1 << 30, inodes=1 << 20
)


class ExecutionRequest(BaseModel):
    """One execution: the code, its language, and what it receives."""

    model_config = ConfigDict(extra="forbid")

    code: str = Field(min_length=1, description="Program source text.")
    language: str = Field("javascript", description="javascript, python or bash (aliases: js, node, py, sh).")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables for this run only (credentials go here)."
    )
    stdin: str | None = Field(None, description="Text given to the program on standard input.")
    files: dict[str, FileBytes] = Field(
        default_factory=dict,
        description="Files written into the working directory before the run: path -> content"
        " (base64 in JSON; bytes, or text via Executor.execute, in Python).",
    )
    collect: list[str] = Field(
        default_factory=list,
        max_length=MAX_COLLECT_PATTERNS,
        description="Glob patterns (relative to the working directory; '*' within a name, '**' across"
        " directories) of files to return in result.files. Symlinks are never followed; the total is capped"
        " by limits.output_bytes.",
    )
    timeout: float | None = Field(None, gt=0, description="Wall-clock limit in seconds (overrides limits.timeout).")
    limits: Limits | None = Field(None, description="Per-run limits; unset fields take the executor's defaults.")
    image: str | None = Field(None, description="Sandbox image; the executor's default when unset.")
    isolation: Isolation | None = Field(
        None,
        description="container (runc: namespaces, cgroups, seccomp on the host kernel) or gvisor (the same around"
        " gVisor's kernel, which answers the program's system calls itself); the executor's default when unset.",
    )
    state: Any = Field(
        None,
        description="JSON state given to the program (env EXECBOX_STATE, and STATE_<KEY> for scalar keys);"
        " the program hands state back by printing a line OUTPUT_STATE:<json>.",
    )
    user_id: str | None = Field(None, description="The end user the run is for (state store, volume).")
    volume: bool = Field(
        False,
        description="Mount the user's own persistent volume (needs user_id) at /data, read-write, size-capped;"
        " created on first use.",
    )
    network: NetworkPolicy | None = Field(
        None,
        description="Egress: none by default (no network at all). mode='proxy' puts the run behind the egress"
        " proxy with this policy (allow/deny host patterns, deny wins, default deny).",
    )
    secrets: dict[str, Secret] = Field(
        default_factory=dict,
        description="Secrets the program never sees: env var NAME holds a placeholder that the proxy replaces"
        " with the real value only on requests to the secret's hosts (needs network mode 'proxy').",
    )
    persist_state: bool = Field(
        False,
        description="Load the user's state from the state store before the run and save result.state after a"
        " successful run (exit 0, no timeout). Runs of one user with this flag are serialized.",
    )

    @field_validator("user_id")
    @classmethod
    def _user_id(cls, v: str | None) -> str | None:
        if v is not None:
            from .state.base import check_id

            check_id("user_id", v)
        return v

    @field_validator("code")
    @classmethod
    def _code(cls, v: str) -> str:
        return check_code(v)

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        return check_env(v)

    @field_validator("files")
    @classmethod
    def _file_paths(cls, v: dict[str, bytes]) -> dict[str, bytes]:
        for path in v:
            check_rel_path(path, "file path")
        return v

    @field_validator("collect")
    @classmethod
    def _collect_patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            check_rel_path(pattern, "collect pattern")
        return v


class RunResult(BaseModel):
    """What running code produced, an execution or one call in a session. Timeouts and OOM
    kills are fields, not exceptions."""

    language: str = Field(description="The language the code ran as (canonical name).")
    isolation: Isolation = Field("container", description="The isolation the code ran under: container or gvisor.")
    stdout: str = Field("", description="Standard output of the program, up to limits.output_bytes.")
    stderr: str = Field("", description="Standard error of the program, up to limits.output_bytes.")
    exit_code: int = Field(description="The program's exit code; 128+N when killed by signal N.")
    signal: int | None = Field(None, description="Signal that ended the program, if any.")
    duration_ms: float = Field(description="Wall-clock time, as the caller saw it.")
    run_ms: float | None = Field(None, description="Time the program itself ran, measured in the sandbox.")
    timed_out: bool = Field(False, description="The program ran past its timeout and was interrupted or killed.")
    oom_killed: bool = Field(False, description="The program was killed because it ran out of memory.")
    output_truncated: bool = Field(False, description="Some output beyond limits.output_bytes was dropped.")
    files: dict[str, FileBytes] = Field(
        default_factory=dict, description="Files matched by the collect patterns (base64 in JSON)."
    )
    files_truncated: bool = Field(False, description="Some matching files were left out (size or count cap).")


class ExecutionResult(RunResult):
    """What one execution produced. Timeouts and OOM kills are fields, not exceptions."""

    id: str = Field(description="Execution id (also in execbox's logs).")
    node: str = Field("", description="The node (host) that ran it: its name, by default the host name.")
    sandbox_id: str = Field("", description="Id of the container that ran the code (used once, then removed).")
    state: Any = Field(None, description="The state the program handed back (its last OUTPUT_STATE: line).")
    state_error: str | None = Field(None, description="Why the handed-back state was not accepted or saved.")
    state_saved: bool = Field(False, description="The state was saved to the state store (persist_state).")
    network_log: list[NetworkLogEntry] = Field(
        default_factory=list, description="One entry per request through the egress proxy (headers redacted)."
    )
