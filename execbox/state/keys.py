"""Every Redis key prefix execbox uses, in one place. Every key gets a TTL."""

PREFIX = "execbox:"
STATE = PREFIX + "state:"  # hash {v, ver, updated}: one user's state, TTL = store ttl
LOCK = PREFIX + "lock:"  # string token: a user's stateful-run lock, TTL = lease


def state_key(tenant: str, user: str) -> str:
    return f"{STATE}{tenant}:{user}"


def lock_key(tenant: str, user: str) -> str:
    return f"{LOCK}{tenant}:{user}"
