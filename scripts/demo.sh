#!/usr/bin/env bash
# Set up execbox and run a demo execution.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
echo '$ execbox run -c "console.log(\"hello from\", process.version, \"as uid\", process.getuid(), \"key:\", process.env.KEYBOARD_STRIPE_KEY)" -e KEYBOARD_STRIPE_KEY=sk_test_1'
.venv/bin/execbox run -c 'console.log("hello from", process.version, "as uid", process.getuid(), "key:", process.env.KEYBOARD_STRIPE_KEY)' -e KEYBOARD_STRIPE_KEY=sk_test_1
