"""The ``execbox`` command line: run code, build images, collect orphans."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from .engine.base import ISOLATIONS, Engine
from .exceptions import ExecboxError, InvalidRequestError

__all__ = ["main"]

_EXTENSIONS = {".js": "javascript", ".mjs": "javascript", ".cjs": "javascript", ".py": "python", ".sh": "bash"}


def _parse_env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            # K alone: take the value from this shell, as `docker run -e K` does.
            if name not in os.environ:
                raise InvalidRequestError("env", f"{name!r} is not K=V and is not set in this shell")
            value = os.environ[name]
        env[name] = value
    return env


def _outcome_notes(result: Any) -> list[str]:
    """What the user should know about how a run or session call ended."""
    notes = []
    if result.timed_out:
        notes.append("timed out")
    if result.oom_killed:
        notes.append("killed: out of memory")
    if result.output_truncated:
        notes.append("output truncated")
    return notes


def _cmd_run(args: argparse.Namespace) -> int:
    from . import Executor

    if args.code is not None and args.file is not None:
        raise InvalidRequestError("code", "give either a FILE or -c CODE, not both")
    if args.code is not None:
        code = args.code
    elif args.file == "-" or args.file is None:
        if args.file is None and sys.stdin.isatty():
            raise InvalidRequestError("code", "give a FILE, -c CODE, or code on stdin")
        code = sys.stdin.read()
    else:
        path = Path(args.file)
        try:
            code = path.read_text()
        except OSError as exc:
            raise InvalidRequestError("file", f"cannot read {path}: {exc.strerror}") from None
    language = args.language or _EXTENSIONS.get(Path(args.file or "").suffix.lower(), "javascript")
    limits: dict[str, Any] = {
        k: v
        for k, v in {
            "memory": args.memory,
            "cpus": args.cpus,
            "pids": args.pids,
            "output_bytes": args.output_bytes,
            "disk": args.disk,
        }.items()
        if v is not None
    }
    if args.server:
        return _run_remote(args, code, language, limits)
    stream = None
    if not args.json:

        def stream(name: str, chunk: bytes) -> None:
            target = sys.stdout if name == "stdout" else sys.stderr
            target.buffer.write(chunk)
            target.flush()

    # One run per process: a warm pool would only create containers nobody uses.
    options: dict[str, Any] = {"pool": False, "isolation": _settings().isolation}
    if args.image:
        options["image"] = args.image
    with Executor(_engine(args), **options) as ex:
        result = ex.execute(
            code,
            _parse_env(args.env),
            language=language,
            timeout=args.timeout,
            limits=limits or None,
            on_output=stream,
            isolation=args.isolation,
        )
    if args.json:
        print(json.dumps(result.model_dump(), indent=2))
    else:
        _print_notes(result)
    return result.exit_code


def _print_notes(result: Any) -> None:
    notes = _outcome_notes(result)
    if notes:
        print(f"execbox: {', '.join(notes)}", file=sys.stderr)


def _run_remote(args: argparse.Namespace, code: str, language: str, limits: dict[str, Any]) -> int:
    """``execbox run --server URL``: the same run, through the HTTP service."""
    from .client import Client

    options: dict[str, Any] = {
        "language": language,
        "timeout": args.timeout,
        "limits": limits or None,
        "image": args.image,
        "isolation": args.isolation,
    }
    with Client(args.server, api_key=_api_key(args)) as client:
        if args.json:
            result = client.execute(code, _parse_env(args.env), **options)
            print(json.dumps(result.model_dump(), indent=2))
            return result.exit_code
        for event in client.stream(code, _parse_env(args.env), **options):
            if event.result is not None:
                _print_notes(event.result)
                return event.result.exit_code
            target = sys.stdout if event.kind == "stdout" else sys.stderr
            target.write(event.data)
            target.flush()
    raise ExecboxError("the service ended the stream without a result")


def _cmd_node(args: argparse.Namespace) -> int:
    import signal

    from .node import run_node
    from .settings import Settings

    overrides = {
        "queue_url": args.queue_url,
        "engine_url": args.node_engine_url or args.engine_url,
        "node_name": args.name,
        "data_dir": args.data_dir,
        "node_slots": args.slots,
        "node_metrics": args.metrics_port,
    }
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    from .server.logging import configure_logging

    configure_logging(settings.log_level, settings.log_json)  # as `execbox serve` does
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # until the node's own handlers are set
    return run_node(settings)


def _cmd_serve(args: argparse.Namespace) -> int:
    from .server.app import serve
    from .settings import Settings

    overrides: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "tenants_file": args.tenants,
        "queue_url": args.queue_url,
        "engine_url": args.engine_url,
    }
    if args.no_auth:
        overrides["no_auth"] = True
    settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    # uvicorn handles SIGTERM/SIGINT (graceful shutdown) and re-raises them once done: make that a no-op,
    # so that a clean shutdown exits 0.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    signal.signal(signal.SIGINT, lambda signum, frame: None)
    return serve(settings)


def _settings() -> Any:
    """The EXECBOX_* settings (read by settings.py, like the service's): defaults for flags not given."""
    from .settings import Settings

    return Settings()


def _engine(args: argparse.Namespace) -> Engine:
    """The engine of --engine-url (or EXECBOX_ENGINE_URL; default the local Docker Engine)."""
    from .engine import open_engine

    return open_engine(getattr(args, "engine_url", None) or _settings().engine_url, timeout=600)


def _api_key(args: argparse.Namespace) -> str | None:
    return getattr(args, "api_key", None) or _settings().api_key  # type: ignore[no-any-return]


def _cmd_images_build(args: argparse.Namespace) -> int:
    """Steps (and a live bar on a terminal) on stderr, every detail line in the log, results on stdout."""
    from .images import BuildProgress

    specs = _specs_from_args(args)
    engine = _engine(args)
    engine.ping()
    log_path: Path = args.log or Path(tempfile.gettempdir()) / "execbox-images-build.log"
    with open(log_path, "w") as log:
        progress = BuildProgress(sys.stderr, log)
        try:
            return _images_build(args, specs, engine, progress)
        except BaseException:
            progress.finish()
            print(f"execbox: the build failed; its whole output is in {log_path}", file=sys.stderr)
            raise
        finally:
            progress.finish()


def _images_build(args: argparse.Namespace, specs: list[Any], engine: Engine, progress: Any) -> int:
    from .images import build_images, build_spec, host_ca_bundle, plan_spec

    # With specs, --force applies to them; the base images are only built when missing.
    tag = build_images(engine, progress=progress, force=args.force and not specs)
    if not specs:
        print(tag)
        return 0
    if args.no_ca_bundle:
        ca = None
    elif args.ca_bundle is not None:
        try:
            ca = args.ca_bundle.read_bytes()
        except OSError as exc:
            raise InvalidRequestError("ca-bundle", f"cannot read {args.ca_bundle}: {exc.strerror}") from None
    else:
        ca = host_ca_bundle()
    if args.print_dockerfile:
        for spec in specs:
            spec_tag, plan, _ = plan_spec(engine, spec, ca, progress)
            print(f"# {spec_tag}\n{plan.dockerfile}")
        return 0
    built = []
    for spec in specs:
        built.append((spec.name, build_spec(engine, spec, progress=progress, force=args.force, ca_bundle=ca)))
    for name, spec_tag in built:
        print(f"{name}: {spec_tag}")
    return 0


def _specs_from_args(args: argparse.Namespace) -> list[Any]:
    """The specs named on the command line, then the one described by flags (if any); all validated."""
    from .images.spec import FileEntry, ImageSpec

    specs = [ImageSpec.load(path) for path in args.specs]
    flags = bool(args.apt or args.pip or args.npm or args.file or args.base or args.description)
    if args.name is None:
        if flags:
            raise InvalidRequestError("name", "--name is needed to build an image from --apt/--pip/--npm/--file")
    else:
        files = []
        for item in args.file:
            dest, sep, src = item.partition("=")
            if not sep:
                raise InvalidRequestError("file", f"{item!r} is not /PATH/IN/IMAGE=SOURCE")
            files.append(FileEntry(dest, Path(src).resolve()))
        specs.append(
            ImageSpec(
                name=args.name,
                description=args.description or "",
                base=args.base,
                apt=tuple(args.apt),
                pip=tuple(args.pip),
                npm=tuple(args.npm),
                files=tuple(files),
            )
        )
    names = [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InvalidRequestError("spec.name", f"more than one spec named {', '.join(dupes)}")
    return specs


def _cmd_images_ls(args: argparse.Namespace) -> int:
    from .images import IMAGE_LABEL, default_image, list_spec_images

    engine = _engine(args)
    current = default_image()
    rows = []
    for img in engine.images([IMAGE_LABEL]):
        role = img.labels.get(IMAGE_LABEL, "")
        if role == "spec":
            continue
        for tag in img.tags:
            rows.append((tag, img.size, role + ("  (default)" if tag == current else "")))
    for spec in list_spec_images(engine):
        if spec.current:
            note = f'image="{spec.name}"  {spec.packages}'
        else:
            note = f"{spec.name}, superseded (execbox images prune)"
        rows.append((spec.tag, spec.size, note))
    width = max((len(r[0]) for r in rows), default=0)
    for tag, size, note in rows:
        print(f"{tag:<{width}}  {size / 1e6:>5.0f} MB  {note}")
    return 0


def _cmd_images_rm(args: argparse.Namespace) -> int:
    from .images import remove_spec

    engine = _engine(args)
    for name in args.names:
        for ref in remove_spec(engine, name):
            print(f"removed {ref}")
    return 0


def _cmd_images_prune(args: argparse.Namespace) -> int:
    from .images import prune_specs

    engine = _engine(args)
    removed = [ref for name in args.names or [None] for ref in prune_specs(engine, name)]
    for ref in removed:
        print(f"removed {ref}")
    print(f"{len(removed)} removed")
    return 0


def _cmd_gc(args: argparse.Namespace) -> int:
    from .reaper import sweep

    removed = sweep(_engine(args), everything=args.all)
    for res in removed:
        print(f"removed {res.kind} {res.id[:12]}")
    print(f"{len(removed)} removed")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="execbox", description="Run untrusted code in fresh, locked-down containers.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what execbox does (to stderr)")
    p.add_argument(
        "--engine-url",
        metavar="URL",
        help="container engine: docker: (default), unix:///path/docker.sock, tcp://host:port (or $EXECBOX_ENGINE_URL)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run code once in a new container")
    run.add_argument("file", nargs="?", help="program file (language from its extension); - for stdin")
    run.add_argument("-c", "--code", help="program text")
    run.add_argument("-l", "--language", help="javascript, python or bash")
    run.add_argument("-e", "--env", action="append", default=[], metavar="K=V", help="environment variable")
    run.add_argument("-t", "--timeout", type=float, help="wall-clock limit in seconds (default 10)")
    run.add_argument("-m", "--memory", help="memory limit, e.g. 128m (default 256m)")
    run.add_argument("--cpus", type=float, help="CPU cores (default 1)")
    run.add_argument("--pids", type=int, help="process limit (default 128)")
    run.add_argument("--output-bytes", help="cap per output stream (default 1m)")
    run.add_argument("--disk", help="size of /work and /tmp (default 64m)")
    run.add_argument("--image", help="sandbox image (default: the locally built one)")
    run.add_argument(
        "--isolation", choices=ISOLATIONS, help="container (runc, the default) or gvisor (gVisor's kernel: runsc)"
    )
    run.add_argument("--json", action="store_true", help="print the whole result as JSON")
    run.add_argument("--server", metavar="URL", help="run on an execbox service instead of the local engine")
    run.add_argument(
        "--api-key",
        metavar="KEY",
        help="API key for --server (default: $EXECBOX_API_KEY)",
    )
    run.set_defaults(func=_cmd_run)

    serve = sub.add_parser("serve", help="serve the HTTP API (settings also from EXECBOX_* variables)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default 8080)")
    serve.add_argument("--tenants", type=Path, metavar="FILE", help="tenants TOML file (or $EXECBOX_TENANTS_FILE)")
    serve.add_argument("--no-auth", action="store_true", help="serve without API keys: local use on loopback only")
    serve.add_argument(
        "--queue-url", metavar="URL", help="run on `execbox node` workers through this Redis ($EXECBOX_QUEUE_URL)"
    )
    serve.set_defaults(func=_cmd_serve)

    node = sub.add_parser(
        "node", help="take runs and sessions from a cluster's queue and run them on this host's engine"
    )
    node.add_argument(
        "--queue-url", metavar="URL", help="the cluster's Redis, redis://HOST:PORT/DB ($EXECBOX_QUEUE_URL)"
    )
    node.add_argument(
        "--engine-url", dest="node_engine_url", metavar="URL", help="this host's engine ($EXECBOX_ENGINE_URL)"
    )
    node.add_argument("--name", metavar="NAME", help="the node's name ($EXECBOX_NODE_NAME; default: the host name)")
    node.add_argument("--data-dir", metavar="DIR", help="volumes, sessions and state of this node ($EXECBOX_DATA_DIR)")
    node.add_argument("--slots", type=int, metavar="N", help="runs taken at once ($EXECBOX_NODE_SLOTS; default 4)")
    node.add_argument(
        "--metrics-port",
        metavar="[HOST:]PORT",
        help="serve this node's own Prometheus /metrics there (PORT alone: 127.0.0.1; $EXECBOX_NODE_METRICS)",
    )
    node.set_defaults(func=_cmd_node)

    images = sub.add_parser("images", help="sandbox images, and package images built from specs")
    isub = images.add_subparsers(dest="images_command", required=True)
    build = isub.add_parser(
        "build",
        help="build the sandbox images, then the package images of the SPECs / flags (cached by hash)",
        description="Without SPEC or --name: build the sandbox images from Debian packages. With them: also "
        "build each package image (apt/pip/npm packages and files on top of the sandbox image), unless a "
        "build of exactly that spec exists. Run code in one with execute(..., image=NAME) or run --image NAME.",
    )
    build.add_argument("specs", nargs="*", metavar="SPEC", type=Path, help="image spec file (TOML)")
    build.add_argument(
        "--log",
        type=Path,
        metavar="FILE",
        help="where every line of the build goes (default: execbox-images-build.log in the temp dir)",
    )
    build.add_argument("--force", action="store_true", help="rebuild even if up to date (specs: without cache)")
    build.add_argument("--name", help="build a package image from the flags below, named NAME")
    build.add_argument("--description", help="what the image is for")
    build.add_argument("--base", help="base image: a tag or a package image name (default: the sandbox image)")
    build.add_argument("--apt", action="append", default=[], metavar="PKG", help="Debian package (repeatable)")
    build.add_argument("--pip", action="append", default=[], metavar="NAME==VER", help="PyPI package, pinned")
    build.add_argument("--npm", action="append", default=[], metavar="NAME@VER", help="npm package, pinned")
    build.add_argument(
        "--file", action="append", default=[], metavar="/PATH=SRC", help="add file or folder SRC at /PATH"
    )
    build.add_argument(
        "--ca-bundle",
        type=Path,
        metavar="FILE",
        help="CA certificates pip and npm trust in the build stage (default: this host's)",
    )
    build.add_argument("--no-ca-bundle", action="store_true", help="pip and npm use the image's own CAs")
    build.add_argument("--print-dockerfile", action="store_true", help="print the generated Dockerfiles, build none")
    build.set_defaults(func=_cmd_images_build)
    ls = isub.add_parser("ls", help="list execbox images (package images with their name and packages)")
    ls.set_defaults(func=_cmd_images_ls)
    rm = isub.add_parser("rm", help="remove every build of package images NAME (and their build cache)")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(func=_cmd_images_rm)
    prune = isub.add_parser("prune", help="remove superseded builds of package images and unused build caches")
    prune.add_argument("names", nargs="*", metavar="NAME", help="only these package images (default: all)")
    prune.set_defaults(func=_cmd_images_prune)

    gc = sub.add_parser("gc", help="remove orphaned execbox containers, volumes and networks")
    gc.add_argument("--all", action="store_true", help="remove every execbox resource, orphaned or not")
    gc.set_defaults(func=_cmd_gc)
    from .cli_session import add_parser as add_session_parser
    from .mcp.stdio import add_parser as add_mcp_parser

    add_session_parser(sub)
    add_mcp_parser(sub)
    return p


def _terminate(signum: int, frame: object) -> None:
    # Unwind normally so that every `finally` removes what it created.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args.func(args))
    except InvalidRequestError as exc:
        print(f"execbox: invalid {exc.field}: {exc.message}", file=sys.stderr)
        return 2
    except ExecboxError as exc:
        print(f"execbox: {exc}", file=sys.stderr)
        return 125
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
