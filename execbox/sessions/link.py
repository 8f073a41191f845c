"""The host's end of a connection to a session's agent: the attach stream that created it, or
a relay started in its container (``docker exec session_agent.py --relay``) by a process
that adopted it."""

from __future__ import annotations

from ..agentlink import AgentLink, LinkEnded
from ..engine.base import Channel

__all__ = ["LinkEnded", "SessionLink"]


class SessionLink(AgentLink):
    """One connection to a session's agent, and whether a call is using it now."""

    def __init__(self, container_id: str, channel: Channel, via: str) -> None:
        super().__init__(channel, max_frame=1 << 17)
        self.container_id = container_id
        self.via = via  # "attach" | "relay"
        self.in_use = False
