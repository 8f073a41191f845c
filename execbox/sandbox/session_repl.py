"""Python REPL worker of a session (standard library only).

Started by ``session_agent.py`` as ``python3 session_repl.py CTRL_FD STATUS_FD``. It
writes {"ready": true} on STATUS_FD, then for each message on CTRL_FD (a big-endian
uint32 length, then JSON {"id", "code", "env"}) runs the code in one persistent
``__main__`` namespace, as a notebook cell: variables, functions and imports stay for
the next call; a last bare expression is echoed through ``sys.displayhook``; top-level
``await`` works; an exception prints its traceback (the cell's frames only) and gives
exit code 1; ``sys.exit(n)`` gives exit code n and the session goes on. ``env`` holds
for this call only. Then it writes {"id", "exit_code", "interrupted"} on STATUS_FD,
after flushing stdout and stderr, so the agent knows the call's output is all written.

SIGINT (the agent's timeout) raises KeyboardInterrupt in the running cell only;
between cells it is ignored.
"""

from __future__ import annotations

import ast
import builtins
import json
import linecache
import os
import signal
import struct
import sys
import traceback
import types
from typing import Any

_LEN = struct.Struct(">I")
# inspect.CO_COROUTINE: a cell with top-level await. asyncio (which loads ssl and libcrypto) and
# inspect are imported only by such a cell: the worker holds ~3 MiB less, which a paused
# session's checkpoint saves and its resume loads (measured: 6.0 -> 3.x MiB).
CO_COROUTINE = 0x80


class _State:
    in_call = False


def _on_sigint(signum: int, frame: Any) -> None:
    if _State.in_call:
        raise KeyboardInterrupt


def _read_exact(fd: int, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _exit_status(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _print_exception(exc: BaseException) -> None:
    """The traceback as the interpreter prints it, without this driver's frames."""
    te = traceback.TracebackException(type(exc), exc, exc.__traceback__)
    seen: set[int] = set()
    stack: traceback.TracebackException | None = te
    while stack is not None and id(stack) not in seen:  # the chain of causes/contexts too
        seen.add(id(stack))
        stack.stack = traceback.StackSummary.from_list([f for f in stack.stack if f.filename != __file__])
        stack = stack.__cause__ or stack.__context__
    sys.stderr.write("".join(te.format()))


def _evaluate(code: types.CodeType, ns: dict[str, Any]) -> Any:
    result = eval(code, ns)
    if code.co_flags & CO_COROUTINE:
        import asyncio

        result = asyncio.run(result)
    return result


def run_cell(source: str, filename: str, ns: dict[str, Any]) -> tuple[int, bool]:
    """Run one cell; its exit code and whether it was interrupted."""
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    try:
        tree = compile(source, filename, "exec", flags | ast.PyCF_ONLY_AST)
    except (SyntaxError, ValueError) as exc:
        traceback.print_exception(type(exc), exc, None)
        return 1, False
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    try:
        if tree.body:
            _evaluate(compile(tree, filename, "exec", flags), ns)
        if last is not None:
            value = _evaluate(compile(last, filename, "eval", flags), ns)
            if value is not None:
                sys.displayhook(value)
        return 0, False
    except SystemExit as exc:
        return _exit_status(exc.code), False
    except KeyboardInterrupt as exc:
        _print_exception(exc)
        return 130, True
    except BaseException as exc:
        _print_exception(exc)
        return 1, False


def main() -> None:
    ctrl, status = int(sys.argv[1]), int(sys.argv[2])
    signal.signal(signal.SIGINT, _on_sigint)
    main_mod = types.ModuleType("__main__")
    main_mod.__dict__["__builtins__"] = builtins
    sys.modules["__main__"] = main_mod
    ns = main_mod.__dict__
    sys.argv = [""]
    sys.path[0] = ""  # the working directory, as in the interactive interpreter
    os.write(status, b'{"ready": true}\n')
    n = 0
    while True:
        head = _read_exact(ctrl, _LEN.size)
        if head is None:
            break
        body = _read_exact(ctrl, _LEN.unpack(head)[0])
        if body is None:
            break
        msg = json.loads(body)
        n += 1
        filename = f"<cell {n}>"
        source = msg["code"]
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        saved = dict(os.environ)
        os.environ.update(msg.get("env") or {})
        exit_code, interrupted = 1, False
        try:
            _State.in_call = True
            exit_code, interrupted = run_cell(source, filename, ns)
        except KeyboardInterrupt:  # arrived outside the cell's own frames
            exit_code, interrupted = 130, True
        finally:
            _State.in_call = False
        os.environ.clear()
        os.environ.update(saved)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        line = json.dumps({"id": msg.get("id"), "exit_code": exit_code, "interrupted": interrupted})
        os.write(status, line.encode() + b"\n")
    os._exit(0)


main()
