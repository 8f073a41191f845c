"""A Python interpreter started ahead of the request (standard library only).

Started by the agent as ``python3 warm_python.py CTRL_FD READY_FD``: it signals
readiness on READY_FD, blocks reading one JSON message from CTRL_FD (the
program's environment and file), then runs the program as ``__main__``, as
``python3 main.py`` would: own module namespace, ``sys.argv``, ``sys.path[0]``,
exit codes, and tracebacks that show only the program's frames.

At the end it does what a normal exit does that a program can observe (wait for
non-daemon threads, run atexit handlers, drop ``__main__``'s globals so their
finalizers run and open files are flushed, flush stdio), then skips the teardown
of the interpreter's own modules, which costs milliseconds and nothing else.
(Objects kept alive only by reference cycles are not finalized at exit, which
CPython does not promise either.)
"""

import json
import os
import sys


def _main() -> None:
    # Imported now, before the request, rather than on the program's clock.
    import atexit  # noqa: F401
    import threading  # noqa: F401
    import types

    # The first open+compile of an interpreter costs ~1 ms (parser and io set-up): pay it here.
    with open(__file__, "rb") as fh:
        compile(fh.read(), "<execbox-warm>", "exec")

    ctrl, ready = int(sys.argv[1]), int(sys.argv[2])
    for name in sys.argv[3:]:  # modules to load ahead (a sandbox on an egress network)
        __import__(name)
    os.write(ready, b"R")
    os.close(ready)
    chunks = []
    while True:
        chunk = os.read(ctrl, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(ctrl)
    msg = json.loads(b"".join(chunks))
    os.environ.clear()
    os.environ.update(msg["env"])
    if msg.get("preload"):
        _preload(msg["preload"])
    path = os.path.abspath(msg["file"])
    sys.argv = [msg["file"]]
    sys.path[0] = os.path.dirname(path)
    main = types.ModuleType("__main__")
    main.__file__ = path
    sys.modules["__main__"] = main
    try:
        with open(path, "rb") as fh:
            code = compile(fh.read(), path, "exec")
        exec(code, main.__dict__)
        status = 0
    except SystemExit as exc:
        status = _exit_status(exc.code)
    except BaseException as exc:  # report as the interpreter would, without our frames
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != path:
            tb = tb.tb_next
        tb = tb or exc.__traceback__
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)
        status = 130 if isinstance(exc, KeyboardInterrupt) else 1
    _finish(main, status)


def _preload(directory: str) -> None:
    """What PYTHONPATH=directory would have done at start-up: on sys.path, and its
    sitecustomize run (the egress preload: proxy tunnelling for socket clients)."""
    sys.path.insert(1, directory)
    path = os.path.join(directory, "sitecustomize.py")
    if os.path.exists(path):
        with open(path, "rb") as fh:
            exec(compile(fh.read(), path, "exec"), {"__name__": "sitecustomize", "__file__": path})


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    try:
        print(code, file=sys.stderr)
    except Exception:
        pass
    return 1


def _finish(main: object, status: int) -> None:
    import atexit
    import threading

    try:
        threading._shutdown()  # type: ignore[attr-defined]
        atexit._run_exitfuncs()
        main.__dict__.clear()
    except SystemExit as exc:  # sys.exit() in an atexit handler or a finalizer
        status = _exit_status(exc.code)
    except BaseException:
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            status = status or 120  # as Python does when flushing stdout fails at exit
    os._exit(status)


_main()
