"""The relay a process starts in a session's sandbox to reach its agent (``docker exec``).

It joins the exec stream (stdin/stdout) to the agent's abstract Unix socket. It is given
as ``python3 -I -S -c CODE`` rather than ``session_agent.py --relay``: importing only
``os``, ``socket``, ``select`` and ``ctypes`` saves the agent's own imports on every
connection (measured: exec plus hello answered, p50 of 10, 153 -> 126 ms under gVisor,
108 -> 74 ms under runc), which every resume and every adoption pays. Like the agent it
makes itself undumpable first: the hello that passes through it carries the session's
token. No secret is in the code itself (same-UID code may read its command line).
"""

from __future__ import annotations

__all__ = ["RELAY", "RELAY_CODE"]

RELAY_CODE = r"""
import os, select, socket
try:
    import ctypes
    ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0
except Exception:
    pass
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect("\0" + os.environ.get("EXECBOX_SESSION_SOCKET", "execbox-session"))
except OSError as exc:
    os.write(2, ("session relay: the session agent does not answer: %s\n" % exc).encode())
    raise SystemExit(1)
fds = [0, s.fileno()]
while True:
    for fd in select.select(fds, [], [])[0]:
        if fd == 0:
            data = os.read(0, 65536)
            if data:
                s.sendall(data)
            else:
                s.shutdown(socket.SHUT_WR)
                fds.remove(0)
        else:
            data = s.recv(65536)
            if not data:
                raise SystemExit(0)
            view = memoryview(data)
            while view:
                view = view[os.write(1, view):]
"""

RELAY = ("python3", "-I", "-S", "-c", RELAY_CODE, "--relay")  # the last argument: to tell it apart in ps
