"""Every Redis key prefix execbox uses, in one place. Every key gets a TTL."""

PREFIX = "execbox:"
STATE = PREFIX + "state:"  # hash {v, ver, updated}: one user's state, TTL = store ttl
LOCK = PREFIX + "lock:"  # string token: a user's stateful-run lock, TTL = lease
RECORD = PREFIX + "rec:"  # string JSON: a small record of execbox itself (session registry), TTL = its own


def state_key(tenant: str, user: str) -> str:
    return f"{STATE}{tenant}:{user}"


def lock_key(tenant: str, user: str) -> str:
    return f"{LOCK}{tenant}:{user}"


def record_key(kind: str, key: str) -> str:
    return f"{RECORD}{kind}:{key}"


def record_pattern(kind: str, prefix: str) -> str:
    """A SCAN MATCH pattern for the records of ``kind`` whose key starts with ``prefix``."""
    escaped = "".join("\\" + c if c in "*?[]\\" else c for c in f"{kind}:{prefix}")
    return f"{RECORD}{escaped}*"
