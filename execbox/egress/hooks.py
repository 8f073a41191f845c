"""Operator hooks: Python code that sees each request/response of a run through the proxy.

A hook subclasses ``EgressHook`` and overrides ``request`` and/or ``response``::

    class InjectStripeKey(EgressHook):
        def __init__(self, key: str) -> None:
            self.key = key

        def request(self, ctx: HookContext, req: HookRequest) -> None:
            if req.host == "api.stripe.com":
                req.headers["Authorization"] = f"Bearer {self.key}"

A request hook may change the method, path and headers and body, ``block()`` the
request (403 to the sandbox) or ``respond()`` with a mock (the upstream is never
contacted). A response hook may change the status, headers and body. Hooks are
registered in ``EgressSettings.hooks`` (objects or ``"module:attribute"`` strings)
or as ``execbox.egress_hooks`` entry points. A hook that raises fails closed: the
request is denied, or the response replaced by an error; never passed unfiltered.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from ..exceptions import ConfigurationError

__all__ = ["ENTRY_POINT_GROUP", "EgressHook", "HookContext", "HookRequest", "HookResponse", "load_hooks"]

ENTRY_POINT_GROUP = "execbox.egress_hooks"


@dataclass(frozen=True)
class HookContext:
    """Who the traffic belongs to."""

    run_id: str
    tenant: str | None
    user_id: str | None


def _encode(body: bytes | str | dict[str, Any] | list[Any]) -> tuple[bytes, str | None]:
    if isinstance(body, bytes):
        return body, None
    if isinstance(body, str):
        return body.encode(), "text/plain; charset=utf-8"
    return json.dumps(body).encode(), "application/json"


class _Message:
    """What requests and responses share: headers and a body (decoded content)."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    @property
    def headers(self) -> MutableMapping[str, str]:
        headers: MutableMapping[str, str] = self._raw.headers
        return headers

    @property
    def body(self) -> bytes:
        return bytes(self._raw.get_content(strict=False) or b"")

    @body.setter
    def body(self, value: bytes) -> None:
        self._raw.content = value

    def json(self) -> Any:
        return json.loads(self.body)


class HookRequest(_Message):
    """A request on its way out (wraps the proxy's request object)."""

    def __init__(self, raw: Any) -> None:
        super().__init__(raw)
        self.blocked: str | None = None
        self.mock: tuple[int, bytes, dict[str, str]] | None = None

    @property
    def method(self) -> str:
        return str(self._raw.method)

    @method.setter
    def method(self, value: str) -> None:
        self._raw.method = value.upper()

    @property
    def host(self) -> str:
        return str(self._raw.host)

    @property
    def port(self) -> int:
        return int(self._raw.port)

    @property
    def path(self) -> str:
        return str(self._raw.path)

    @path.setter
    def path(self, value: str) -> None:
        self._raw.path = value

    @property
    def url(self) -> str:
        return str(self._raw.pretty_url)

    def block(self, reason: str = "blocked by a hook") -> None:
        """Refuse the request: the sandbox gets a 403 with this reason."""
        self.blocked = reason

    def respond(
        self,
        status: int = 200,
        body: bytes | str | dict[str, Any] | list[Any] = b"",
        headers: dict[str, str] | None = None,
    ) -> None:
        """Answer with a mock response; the upstream is not contacted."""
        data, ctype = _encode(body)
        hdrs = dict(headers or {})
        if ctype and not any(k.lower() == "content-type" for k in hdrs):
            hdrs["content-type"] = ctype
        self.mock = (status, data, hdrs)


class HookResponse(_Message):
    """A response on its way back to the sandbox."""

    @property
    def status(self) -> int:
        return int(self._raw.status_code)

    @status.setter
    def status(self, value: int) -> None:
        self._raw.status_code = value

    def set_json(self, value: Any) -> None:
        self.body = json.dumps(value).encode()
        self.headers["content-type"] = "application/json"


class EgressHook:
    """Base class of operator hooks; override what you need."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def request(self, ctx: HookContext, request: HookRequest) -> None:
        """Called before the request leaves (after the policy allowed it)."""

    def response(self, ctx: HookContext, request: HookRequest, response: HookResponse) -> None:
        """Called before the response reaches the sandbox."""


def _load_spec(spec: str) -> EgressHook:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(f"hook {spec!r}: use 'package.module:attribute'")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"hook {spec!r}: {exc}") from exc
    return _as_hook(obj, spec)


def _as_hook(obj: Any, where: str) -> EgressHook:
    if isinstance(obj, type) and issubclass(obj, EgressHook):
        obj = obj()
    if not isinstance(obj, EgressHook):
        raise ConfigurationError(f"hook {where}: {obj!r} is not an EgressHook")
    return obj


def load_hooks(specs: Iterable[Any], use_entry_points: bool = False) -> list[EgressHook]:
    """Hook objects from objects, 'module:attribute' strings and (optionally) entry points."""
    hooks: list[EgressHook] = []
    for spec in specs:
        hooks.append(_load_spec(spec) if isinstance(spec, str) else _as_hook(spec, repr(spec)))
    if use_entry_points:
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            try:
                hooks.append(_as_hook(ep.load(), ep.name))
            except ConfigurationError:
                raise
            except Exception as exc:
                raise ConfigurationError(f"hook entry point {ep.name!r}: {exc}") from exc
    return hooks
