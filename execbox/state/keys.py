"""Every Redis key prefix execbox uses, in one place. Every key gets a TTL."""

PREFIX = "execbox:"
STATE = PREFIX + "state:"  # hash {v, ver, updated}: one user's state, TTL = store ttl
LOCK = PREFIX + "lock:"  # string token: a user's stateful-run lock, TTL = lease
RECORD = PREFIX + "rec:"  # string JSON: a small record of execbox itself (session registry), TTL = its own
STREAM = PREFIX + "q:"  # stream: a work queue (consumer group) or an event log, TTL refreshed on every add
HEARTBEAT = PREFIX + "hb:"  # string: a queue consumer is alive, TTL = heartbeat ttl (refreshed at ttl/3)
JOB = PREFIX + "job:"  # hash: an async execution's record, TTL = unfinished lease, then the job ttl
PENDING = PREFIX + "pending:"  # sorted set of unfinished job ids (score: submission time), TTL refreshed on add


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


def stream_key(name: str) -> str:
    return f"{STREAM}{name}"


def heartbeat_key(consumer: str) -> str:
    return f"{HEARTBEAT}{consumer}"


def job_key(tenant: str, job_id: str) -> str:
    return f"{JOB}{tenant}:{job_id}"


def pending_key(tenant: str | None) -> str:
    """Unfinished jobs of one tenant, or of every tenant (None)."""
    return f"{PENDING}{tenant}" if tenant is not None else f"{PENDING}*all"


NODE = PREFIX + "node:"  # string JSON: a node's status (ready sandboxes, running), TTL = node ttl (its liveness)
RUN = PREFIX + "run:"  # string: the node that took a dispatched run, TTL = the run's deadline + a minute
REPLY = PREFIX + "reply:"  # list: a dispatched run's answer (one JSON item), TTL = a minute


def node_key(name: str) -> str:
    return f"{NODE}{name}"


def run_key(run_id: str) -> str:
    return f"{RUN}{run_id}"


def reply_key(run_id: str) -> str:
    return f"{REPLY}{run_id}"


OUTPUT = PREFIX + "out:"  # stream: a streamed run's output chunks, then its answer; TTL = its deadline + a minute


def output_key(run_id: str) -> str:
    return f"{OUTPUT}{run_id}"


SESSION_NODE = PREFIX + "sesnode:"  # JSON {node, tenant, user_id, info}: a session a node holds, TTL = life + grace
SESSION_INDEX = PREFIX + "sesidx:"  # sorted set of a tenant's node-held session ids (score: expiry), TTL refreshed
NODE_SESSIONS = PREFIX + "nodeses:"  # sorted set of "tenant/id" a node holds (score: expiry), TTL refreshed
VOLUME_NODE = PREFIX + "volnode:"  # string: the node holding a user's volume, TTL = volume max idle (refreshed)
SESSION_CREATE_LOCK = PREFIX + "seslock:"  # redis-py lock: one session creation per user at a time, TTL = its lease


def session_node_key(tenant: str, session_id: str) -> str:
    return f"{SESSION_NODE}{tenant}/{session_id}"


def session_index_key(tenant: str) -> str:
    return f"{SESSION_INDEX}{tenant}"


def node_sessions_key(node: str) -> str:
    return f"{NODE_SESSIONS}{node}"


def volume_node_key(tenant: str, user: str) -> str:
    return f"{VOLUME_NODE}{tenant}:{user}"


def session_create_lock_key(tenant: str, user: str) -> str:
    return f"{SESSION_CREATE_LOCK}{tenant}:{user}"


def node_stream(node: str) -> str:
    """The name (for ``stream_key``) of the stream of work only ``node`` reads: its sessions' calls."""
    return f"node:{node}"
