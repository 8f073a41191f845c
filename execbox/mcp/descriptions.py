"""What the MCP tools tell the model: what persists, the limits, the network (none)."""

from __future__ import annotations

SERVER_INSTRUCTIONS = """\
execbox runs code in isolated, locked-down Linux sandboxes (python 3.11, javascript on Node.js 18, bash).
Use run_code for one-off programs: each call gets a brand-new sandbox that is destroyed afterwards.
Use a session (session_create, then session_run) when state must carry over between calls: in python and
javascript sessions variables, functions and imports persist (like a notebook); files in /work persist in
every session. Sandboxes have no network access, and only the standard library (plus what a named package
image has). Close sessions you no longer need with session_close; idle ones end by themselves."""

_LIMITS = (
    "Limits (defaults; the server may set others): 10 s wall-clock (timeout, up to the server's maximum), "
    "256 MiB memory, 1 CPU, 128 processes, 1 MiB of output per stream (the rest is dropped: truncated), "
    "/work and /tmp writable (64 MiB each), everything else read-only. No network access at all: no "
    "HTTP, DNS or sockets beyond localhost (egress, where a tenant allows it, is only through execbox's own "
    "API, not these tools). A timeout or running out of memory is not an error: the result says timed_out or "
    "oom_killed (exit code 137)."
)

_RESULT = (
    "Result: stdout, stderr, exit_code (0 = success, 1 = uncaught exception, 128+N = killed by signal N), "
    "timed_out, oom_killed, truncated, and files (collected files as text)."
)

RUN_CODE = f"""Run a program once in a fresh, isolated sandbox and return its output.

Nothing persists: every call starts from a new, empty sandbox that is destroyed afterwards (files, variables
and installed packages are all gone; use session_create/session_run to keep state). The program runs as the
main script with /work as its working directory; `files` are written there first and `collect` patterns
return files the program wrote. Only the standard library is available unless `image` names a package image.
{_LIMITS}
{_RESULT}"""

SESSION_CREATE = f"""Start a persistent sandbox session and return its session_id.

In python and javascript sessions, variables, functions and imports persist between session_run calls (a
notebook-like REPL: a last bare expression is echoed); bash sessions run each call in a fresh shell. Files
in /work persist for the session's whole life in every language. A session ends after 10 minutes unused,
after at most 1 hour, or on session_close; the number of live sessions is capped (about 3 per user), so
close sessions you are done with. With isolation 'gvisor' a session can be paused to disk (session_pause, or
pause_after seconds unused): it then holds no memory, and the next session_run resumes it with its variables and
files. {_LIMITS}"""

SESSION_RUN = f"""Run code in a session created by session_create; output is this call's only.

Variables and imports from earlier calls are available (python/javascript), as are files in /work. At the
timeout the call is interrupted and the session survives; if the interpreter had to be restarted
(repl_reset: true) earlier variables are gone but files stay. session_ended: true means the session is over.
A paused session is resumed first (resumed: true; it takes about a second).
{_RESULT}"""

SESSION_WRITE_FILES = """Write text files into a session's /work (relative paths; folders are created).

They stay for the session's life; code run with session_run can read them. Runs no code. The total size is
bounded by the session's disk space (64 MiB by default)."""

SESSION_READ_FILE = """Read one file from a session's /work (path relative to /work, e.g. 'out/result.csv').

Returns its content as text (or base64 for binary files). Files larger than the session's output cap
(1 MiB by default) cannot be read this way: have the code print a summary instead."""

SESSION_CLOSE = """End a session now: its sandbox and every file in it are destroyed."""

SESSION_PAUSE = """Pause a session to disk while you do not need it; it keeps everything.

Only for sessions created with isolation 'gvisor' (others: an error naming isolation). Its memory (variables,
imports) and files in /work are saved and its sandbox stops, so it holds no memory or CPU. Nothing is lost:
the next session_run (or session_resume) continues exactly where it was. A call still running is waited for.
The disk paused sessions may hold is limited: beyond it the pause is refused (an error naming
checkpoint_quota) and the session simply keeps running. Idle and lifetime limits still end a paused session."""

SESSION_RESUME = """Resume a paused session now (session_run resumes one by itself; this only saves that delay).

Its variables, imports and files are as they were when it was paused. Resuming a running session does nothing."""

SESSION_LIST = """List the live sessions (id, language, calls so far, paused or not, when each ends unless used)."""
