"""Job records in Redis: one hash per job, changed only by atomic scripts.

``execbox:job:<tenant>:<id>`` holds ``status``, ``owner`` (the queue consumer that
runs it), ``attempts``/``retries``, times, the request (JSON, dropped when the job
ends: it may carry env values and secrets), the result or error (JSON) and the
webhook's delivery state. Scripts make each step one atomic change:

* ``submit``: check the tenant's and everyone's unfinished-job counts, write the
  record, add it to both pending sets and queue it (``XADD``): a job is accepted
  and queued, or refused, never half of each; sent again (a reply lost), a no-op.
* ``transition``: compare-and-set on (status, owner): exactly one replica starts a
  queued job, and a replica declared dead cannot overwrite the verdict later.
  Ending a job also drops it from the pending sets, announces it on the ``done``
  stream (what ``?wait=`` listens to) and queues its webhook. Sent again after a
  lost reply, it answers 0: the caller checks whether its own write is there.
"""

from __future__ import annotations

import json
from typing import Any

from ..models import ExecutionRequest, ExecutionResult
from .schemas import ErrorBody, ExecutionJob

__all__ = ["FINAL", "SUBMIT", "TRANSITION", "UPDATE", "dump_request", "load_request", "view"]

FINAL = ("completed", "failed")

# KEYS: record, tenant pending, all pending, jobs stream
# ARGV: id, now, tenant limit, all limit, record ttl ms, stale before, maxlen, stream ttl ms, tenant, fields...
SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[6])
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[4]) then return -2 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[3]) then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV, 10))
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[9] .. '/' .. ARGV[1])
redis.call('PEXPIRE', KEYS[3], ARGV[5])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'tenant', ARGV[9], 'id', ARGV[1])
redis.call('PEXPIRE', KEYS[4], ARGV[8])
return 1
"""

# KEYS: record, tenant pending, all pending, done stream, webhooks stream
# ARGV: expected status, expected owner ('*': any), ttl ms, final ('1'), webhook ('1'), tenant, id,
#       maxlen, stream ttl ms, fields...
TRANSITION = """
if redis.call('HGET', KEYS[1], 'status') ~= ARGV[1] then return 0 end
if ARGV[2] ~= '*' and redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 10))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
if ARGV[4] == '1' then
  redis.call('HDEL', KEYS[1], 'request')
  redis.call('ZREM', KEYS[2], ARGV[7])
  redis.call('ZREM', KEYS[3], ARGV[6] .. '/' .. ARGV[7])
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[8], '*', 'tenant', ARGV[6], 'id', ARGV[7])
  redis.call('PEXPIRE', KEYS[4], ARGV[9])
  if ARGV[5] == '1' then
    redis.call('XADD', KEYS[5], 'MAXLEN', '~', ARGV[8], '*', 'tenant', ARGV[6], 'id', ARGV[7])
    redis.call('PEXPIRE', KEYS[5], ARGV[9])
  end
end
return 1
"""

# KEYS: record; ARGV: fields... (only if the record still exists; its TTL is kept)
UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
"""


def dump_request(request: ExecutionRequest) -> str:
    """JSON of the request as it must run elsewhere (secret values included, unlike model_dump)."""
    data: dict[str, Any] = request.model_dump(mode="json")
    data["secrets"] = {
        name: {"value": s.value.get_secret_value(), "hosts": list(s.hosts)} for name, s in request.secrets.items()
    }
    return json.dumps(data, separators=(",", ":"))


def load_request(raw: str) -> ExecutionRequest:
    return ExecutionRequest.model_validate_json(raw)


def _float(rec: dict[str, str], name: str) -> float | None:
    value = rec.get(name, "")
    return float(value) if value else None


def view(rec: dict[str, str], ttl: float) -> ExecutionJob:
    """The job as its tenant sees it, from the record's fields."""
    finished = _float(rec, "finished_at")
    callback = rec.get("callback_status") or None
    return ExecutionJob(
        id=rec["id"],
        status=rec["status"],
        language=rec["language"],
        created_at=float(rec["created_at"]),
        started_at=_float(rec, "started_at"),
        finished_at=finished,
        expires_at=finished + ttl if finished is not None else None,
        result=ExecutionResult.model_validate_json(rec["result"]) if rec.get("result") else None,
        error=ErrorBody.model_validate_json(rec["error"]) if rec.get("error") else None,
        callback_url=rec.get("callback_url") or None,
        callback_status=callback,
        callback_attempts=int(rec.get("callback_attempts") or 0),
        attempts=int(rec.get("attempts") or 0),
        retries=int(rec.get("retries") or 0),
    )
