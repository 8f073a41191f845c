#!/usr/bin/env bash
# Set up execbox, start the service on 127.0.0.1:8080 (no auth: loopback only),
# run demo executions against it, then keep serving until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh

PORT="${EXECBOX_DEMO_PORT:-8080}"
URL="http://127.0.0.1:${PORT}"
.venv/bin/execbox serve --no-auth --port "$PORT" 2>/tmp/execbox-demo-server.log &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 1 100); do
  .venv/bin/python -c "import httpx,sys; sys.exit(httpx.get('$URL/readyz').status_code != 200)" 2>/dev/null && break
  kill -0 "$SERVER" 2>/dev/null || { tail -20 /tmp/execbox-demo-server.log >&2; exit 1; }
  sleep 0.2
done

echo "== POST $URL/execute (the seed's shape: code + env, JavaScript)"
.venv/bin/python - "$URL" <<'PY'
import json, sys, httpx
url = sys.argv[1]
r = httpx.post(f"{url}/execute", json={
    "code": 'console.log("hello from", process.version, "uid", process.getuid(), "key", process.env.KEYBOARD_STRIPE_KEY)',
    "env": {"KEYBOARD_STRIPE_KEY": "sk_test_1"},
}, timeout=60)
body = r.json()
print(r.status_code, json.dumps({k: body[k] for k in ("output", "exit_code", "duration_ms", "sandbox_id")}))
PY
echo "== execbox run --server $URL (Python, a timeout)"
# `execbox run` exits with the program's status: 137 here (killed at its timeout), which is the point.
{ .venv/bin/execbox run --server "$URL" -l python -c 'print("python in a sandbox"); import time; time.sleep(5)' \
    --timeout 1 --json || [ $? -eq 137 ]; } \
  | .venv/bin/python -c 'import json,sys; r=json.load(sys.stdin); print({k: r[k] for k in ("stdout","exit_code","timed_out")})'
echo "== serving on $URL (OpenAPI: $URL/docs); Ctrl-C to stop"
wait "$SERVER"
