"""Persistent per-user sessions: one long-lived, hardened container per session.

The seed's ``PersistentDockerExecutor`` with its challenges answered:

* **security**: a session's container is made by ``sandbox_spec`` exactly as an
  ephemeral run's (non-root UID of its own, read-only root, no capabilities,
  seccomp allowlist, no network, memory/CPU/pids/disk limits); only its life is longer;
* **leaks and cleanup**: every session has an idle timeout and a max lifetime, enforced
  by a reaper thread; per-user and global caps bound how many exist; containers carry
  labels (kind ``session``, an expiry covering the max lifetime) so ``execbox gc``
  collects them even if no ``Sessions`` ever runs again;
* **lifecycle across restarts**: the registry lives in the ``StateStore``, not in the
  process. A container's owner is the registry (label ``execbox.session.registry``),
  not the process that created it: a restarted service, or a second replica on the
  same engine and store, adopts every live session (it connects to the session's agent
  with ``docker exec session_agent.py --relay``), and removes session containers the
  registry does not know.

Inside, ``execbox/sandbox/session_agent.py`` serves calls one at a time; for Python and
JavaScript a REPL worker keeps variables and imports between calls (``repl=True``).

>>> with Sessions(engine, store) as sessions:
...     s = sessions.create("alice", "python")
...     sessions.execute(s.id, "x = 41")
...     sessions.execute(s.id, "print(x + 1)").stdout
'42\\n'
"""

from .core import Sessions
from .models import (
    RECORD_KIND,
    REGISTRY_LABEL,
    SESSION_LABEL,
    SessionCreateRequest,
    SessionExecuteRequest,
    SessionInfo,
    SessionList,
    SessionResult,
    SessionsConfig,
)

__all__ = [
    "RECORD_KIND",
    "REGISTRY_LABEL",
    "SESSION_LABEL",
    "SessionCreateRequest",
    "SessionExecuteRequest",
    "SessionInfo",
    "SessionList",
    "SessionResult",
    "Sessions",
    "SessionsConfig",
]
