#!/usr/bin/env bash
# Set up everything the tests need, then run the whole suite against the real
# Docker Engine and a real Redis. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

# A private Redis on loopback for the state tests (never bound to a bridge address).
REDIS_PORT="${EXECBOX_TEST_REDIS_PORT:-6399}"
if ! redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save '' --appendonly no --daemonize yes \
    --logfile /tmp/execbox-test-redis.log >/dev/null
  for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
export EXECBOX_TEST_REDIS_URL="redis://127.0.0.1:${REDIS_PORT}/0"
# Docker tests must run here, never be skipped.
export EXECBOX_REQUIRE_DOCKER=1

.venv/bin/ruff check execbox tests bench
.venv/bin/ruff format --check execbox tests bench
.venv/bin/mypy
if [ $# -gt 0 ]; then
  exec .venv/bin/pytest -q "$@"
fi
.venv/bin/pytest -q -m "not disruptive and not cluster"
# Restarts dockerd: alone, after everything else.
.venv/bin/pytest -q -m disruptive
# Three more engines in network namespaces (scripts/cluster-bed.sh), torn down after: last.
.venv/bin/pytest -q -m cluster
