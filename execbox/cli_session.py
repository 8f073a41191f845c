"""``execbox session ...``: persistent sessions from the command line (local engine or --server)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from .cli import _api_key, _engine, _outcome_notes, _parse_env, _settings
from .engine.base import ISOLATIONS
from .exceptions import ExecboxError, InvalidRequestError
from .models import check_rel_path

__all__ = ["add_parser"]


class _LocalSessions:
    """``execbox session`` without --server: the library on the local engine, the registry the service's."""

    def __init__(self, args: argparse.Namespace) -> None:
        from .egress import EgressSettings
        from .sessions import Sessions
        from .state import open_store

        # One command per process: no reaper thread (each start does one reaper pass). Egress as
        # the service's (same network and port): each command re-establishes its sessions' grants.
        settings = _settings()
        url = args.store or settings.session_store()
        egress = EgressSettings(
            host_map=settings.proxy_host_map,
            network_name=settings.egress_network,
            proxy_port=settings.egress_proxy_port,
        )
        self.sessions = Sessions(
            _engine(args),
            open_store(url),
            start_reaper=False,
            own_store=True,
            egress=egress,
            isolation=settings.isolation,
        )

    def __enter__(self) -> Any:
        return self.sessions

    def __exit__(self, *exc: object) -> None:
        self.sessions.close()


def _session_backend(args: argparse.Namespace) -> Any:
    if args.server:
        from .client import Client

        return Client(args.server, api_key=_api_key(args))
    return _LocalSessions(args)


def _session_code(args: argparse.Namespace) -> str | None:
    """The call's code; None for a call that only moves files (--file/--collect without code)."""
    if args.code is not None and args.file is not None:
        raise InvalidRequestError("code", "give either a FILE or -c CODE, not both")
    if args.code is not None:
        return str(args.code)
    if args.file is None and (args.put or args.collect):
        return None
    if args.file in (None, "-"):
        if args.file is None and sys.stdin.isatty():
            raise InvalidRequestError("code", "give a FILE, -c CODE, or code on stdin")
        return sys.stdin.read()
    try:
        return Path(args.file).read_text()
    except OSError as exc:
        raise InvalidRequestError("file", f"cannot read {args.file}: {exc.strerror}") from None


def _network_options(args: argparse.Namespace) -> dict[str, Any]:
    """``--network``, ``--policy FILE``, ``--allow``/``--deny`` and ``--secret NAME@HOSTS`` as
    ``network=`` and ``secrets=`` (a secret's value comes from this process's environment)."""
    policy: dict[str, Any] = {}
    if args.policy is not None:
        try:
            policy = json.loads(Path(args.policy).read_text())
        except (OSError, ValueError) as exc:
            raise InvalidRequestError("policy", f"cannot read {args.policy} as a JSON policy: {exc}") from None
        if not isinstance(policy, dict):
            raise InvalidRequestError("policy", 'a JSON object: {"allow": [...], "deny": [...]}')
    for key in ("allow", "deny"):
        if getattr(args, key):
            policy[key] = [*policy.get(key, []), *getattr(args, key)]
    mode = args.network or ("proxy" if policy or args.secret else None)
    if mode is None:
        return {}
    secrets: dict[str, Any] = {}
    for item in args.secret:
        name, sep, hosts = item.partition("@")
        value = os.environ.get(name)
        if not sep or not hosts:
            raise InvalidRequestError("secret", f"{item!r}: give NAME@HOST[,HOST...]")
        if value is None:
            raise InvalidRequestError(f"secrets.{name}", f"set ${name} to the secret's value in this environment")
        secrets[name] = {"value": value, "hosts": hosts.split(",")}
    return {"network": {**policy, "mode": mode}, "secrets": secrets or None}


def _cmd_session_new(args: argparse.Namespace) -> int:
    limits = {k: v for k, v in {"memory": args.memory, "cpus": args.cpus, "timeout": args.timeout}.items() if v}
    options: dict[str, Any] = {
        "image": args.image,
        "isolation": args.isolation,
        "pause_after": args.pause_after,
        "limits": limits or None,
        "idle_timeout": args.idle_timeout,
        "max_lifetime": args.max_lifetime,
        "repl": False if args.no_repl else None,
        **_network_options(args),
    }
    with _session_backend(args) as backend:
        if args.server:
            info = backend.create_session(args.user, args.language, **options)
        else:
            info = backend.create(args.user, args.language, **options)
    print(info.model_dump_json(indent=2) if args.json else info.id)
    return 0


def _put_files(items: list[str]) -> dict[str, bytes]:
    """``--file PATH=LOCAL`` (or ``--file LOCAL``, kept under its own name) as path -> content."""
    files: dict[str, bytes] = {}
    for item in items:
        dest, sep, src = item.partition("=")
        if not sep:
            dest, src = Path(item).name, item
        try:
            files[dest] = Path(src).read_bytes()
        except OSError as exc:
            raise InvalidRequestError("file", f"cannot read {src}: {exc.strerror}") from None
    return files


def _save_collected(files: dict[str, bytes], out_dir: Path) -> None:
    """Write collected files under ``out_dir``: names come from the sandbox, so each is checked first."""
    for rel, data in files.items():
        try:
            check_rel_path(rel)
        except ValueError:
            print(f"execbox: skipped a collected file with an unsafe name: {rel!r}", file=sys.stderr)
            continue
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def _stream_to_terminal(name: str, chunk: bytes) -> None:
    target = sys.stdout if name == "stdout" else sys.stderr
    target.buffer.write(chunk)
    target.flush()


def _cmd_session_exec(args: argparse.Namespace) -> int:
    code = _session_code(args)
    env = _parse_env(args.env)
    call: dict[str, Any] = {"timeout": args.timeout, "files": _put_files(args.put), "collect": args.collect}
    with _session_backend(args) as backend:
        if args.server and args.json:
            result = backend.session_execute(args.id, code, env, **call)
        elif args.server:
            result = None
            for event in backend.session_stream(args.id, code, env, **call):
                if event.result is not None:
                    result = event.result
                else:
                    _stream_to_terminal(event.kind, event.data.encode())
            if result is None:
                raise ExecboxError("the service ended the stream without a result")
        else:
            on_output = None if args.json else _stream_to_terminal
            result = backend.execute(args.id, code, env, tenant="default", on_output=on_output, **call)
    if result.files:
        _save_collected(result.files, args.out)
    if args.json:
        print(result.model_dump_json(indent=2))
        return int(result.exit_code)
    notes = _outcome_notes(result)
    if result.files_truncated:
        notes.append("some collected files were left out (size cap)")
    if result.repl_reset:
        notes.append("the REPL was restarted: earlier variables are gone")
    if result.session_ended:
        notes.append("the session ended")
    if notes:
        print(f"execbox: {', '.join(notes)}", file=sys.stderr)
    return int(result.exit_code)


def _cmd_session_ls(args: argparse.Namespace) -> int:
    with _session_backend(args) as backend:
        found = backend.list_sessions() if args.server else backend.list()
    if args.json:
        print(json.dumps([s.model_dump(mode="json") for s in found], indent=2))
        return 0
    now = time.time()
    for s in found:
        print(
            f"{s.id}  {s.user_id:<16} {s.language:<10} {'repl' if s.repl else 'run ':<4} "
            f"calls={s.calls:<5} ends in {max(s.expires_at - now, 0):.0f} s" + ("  paused" if s.paused else "")
        )
    return 0


def _cmd_session_rm(args: argparse.Namespace) -> int:
    with _session_backend(args) as backend:
        for sid in args.ids:
            if args.server:
                backend.delete_session(sid)
            else:
                backend.delete(sid)
            print(f"removed {sid}")
    return 0


def _cmd_session_pause(args: argparse.Namespace) -> int:
    """``pause`` / ``resume``: the session to disk and back (isolation gvisor)."""
    with _session_backend(args) as backend:
        for sid in args.ids:
            if args.server:
                info = backend.pause_session(sid) if args.action == "pause" else backend.resume_session(sid)
            else:
                info = backend.pause(sid) if args.action == "pause" else backend.resume(sid)
            print(f"{sid} {'paused' if info.paused else 'running'}")
    return 0


def add_parser(sub: Any) -> None:
    """The ``session`` subcommand of the ``execbox`` CLI."""
    session = sub.add_parser(
        "session",
        help="persistent sessions: files (and, for python/javascript, variables) kept between calls",
        description="Without --server the sessions run on the local engine and their registry is a SQLite "
        "file (or --store URL), so every command adopts the sessions earlier ones created.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", metavar="URL", help="use an execbox service instead of the local engine")
    common.add_argument(
        "--api-key",
        metavar="KEY",
        help="API key for --server (default: $EXECBOX_API_KEY)",
    )
    common.add_argument(
        "--store",
        metavar="URL",
        help="local registry: redis://... or sqlite:///path (default: the service's, $EXECBOX_SESSION_STORE_URL,"
        " else $EXECBOX_STATE_URL, else SQLite under the data dir)",
    )
    common.add_argument("--json", action="store_true", help="print JSON")
    ssub = session.add_subparsers(dest="session_command", required=True)
    new = ssub.add_parser("new", parents=[common], help="start a session; prints its id")
    new.add_argument("-l", "--language", default="python", help="python (default), javascript or bash")
    new.add_argument("-u", "--user", default="cli", help="the user the session is for (default: cli)")
    new.add_argument("--image", help="sandbox image or package image name")
    new.add_argument(
        "--isolation", choices=ISOLATIONS, help="container (runc) or gvisor (runsc); default: the service's"
    )
    new.add_argument("-m", "--memory", help="memory limit, e.g. 512m (default 256m)")
    new.add_argument("--cpus", type=float, help="CPU cores (default 1)")
    new.add_argument("-t", "--timeout", type=float, help="default timeout per call (s)")
    new.add_argument("--idle-timeout", type=float, help="end it after this many seconds unused (default 600)")
    new.add_argument("--max-lifetime", type=float, help="end it this many seconds after creation (default 3600)")
    new.add_argument(
        "--pause-after",
        type=float,
        metavar="SECONDS",
        help="pause it to disk after this many seconds unused (gvisor only; its next call resumes it)",
    )
    new.add_argument("--no-repl", action="store_true", help="run each call afresh (files still persist)")
    new.add_argument(
        "--network", choices=("none", "proxy"), help="egress (default none; proxy with --allow/--policy/--secret)"
    )
    new.add_argument("--allow", action="append", default=[], metavar="HOST", help="allow a host ('*.github.com')")
    new.add_argument("--deny", action="append", default=[], metavar="HOST", help="deny a host (wins over allow)")
    new.add_argument("--policy", metavar="FILE", help="JSON network policy (allow, deny, redact_headers, ...)")
    new.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="NAME@HOSTS",
        help="secret from $NAME, sent only to HOSTS (comma-separated); the session sees a placeholder",
    )
    new.set_defaults(func=_cmd_session_new)
    ex = ssub.add_parser("exec", parents=[common], help="run code in a session")
    ex.add_argument("id", help="session id")
    ex.add_argument("file", nargs="?", help="program file; - for stdin")
    ex.add_argument("-c", "--code", help="program text")
    ex.add_argument("-e", "--env", action="append", default=[], metavar="K=V", help="environment variable")
    ex.add_argument("-t", "--timeout", type=float, help="limit of this call (s)")
    ex.add_argument(
        "--file",
        dest="put",
        action="append",
        default=[],
        metavar="PATH=LOCAL",
        help="write LOCAL into the session's /work as PATH before the code runs (LOCAL alone: same name)",
    )
    ex.add_argument(
        "--collect", action="append", default=[], metavar="PATTERN", help="bring back files of /work ('out/*.png')"
    )
    ex.add_argument("--out", type=Path, default=Path("."), metavar="DIR", help="where collected files go (default .)")
    ex.set_defaults(func=_cmd_session_exec)
    ls = ssub.add_parser("ls", parents=[common], help="list live sessions")
    ls.set_defaults(func=_cmd_session_ls)
    rm = ssub.add_parser("rm", parents=[common], help="end sessions now")
    rm.add_argument("ids", nargs="+", metavar="ID")
    rm.set_defaults(func=_cmd_session_rm)
    for action, text in (("pause", "pause sessions to disk (isolation gvisor)"), ("resume", "resume paused sessions")):
        cmd = ssub.add_parser(action, parents=[common], help=text)
        cmd.add_argument("ids", nargs="+", metavar="ID")
        cmd.set_defaults(func=_cmd_session_pause, action=action)
