#!/usr/bin/env bash
# Set up execbox on a Debian machine, idempotently: Docker Engine (started if none
# answers) with gVisor's runsc registered as runtimes, debootstrap, Redis, the .venv with
# execbox installed, the sandbox images. Fast when already done. Run as root (apt, dockerd).
set -euo pipefail
cd "$(dirname "$0")/.."
log() { printf '[setup] %s\n' "$*" >&2; }

need_pkgs=()
command -v dockerd >/dev/null 2>&1 || need_pkgs+=(docker.io)
[ -x /usr/bin/docker ] || need_pkgs+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || need_pkgs+=(debootstrap)
command -v redis-server >/dev/null 2>&1 || need_pkgs+=(redis-server)
command -v iptables >/dev/null 2>&1 || need_pkgs+=(iptables)
[ -x /usr/bin/runsc ] || need_pkgs+=(runsc)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  log "installing ${need_pkgs[*]} with apt"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# The Debian client matches the engine; a newer client elsewhere on PATH is not needed.
DOCKER=/usr/bin/docker
RUNTIMES=execbox/engine/docker-runtimes.json
start_dockerd() {
  log "starting dockerd (log: /var/log/execbox-dockerd.log)"
  setsid nohup dockerd >>/var/log/execbox-dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 1 120); do
    "$DOCKER" info >/dev/null 2>&1 && break
    sleep 0.5
  done
  "$DOCKER" info >/dev/null 2>&1 || { tail -20 /var/log/execbox-dockerd.log >&2; log "dockerd did not start"; exit 1; }
}
runtimes_missing() {  # names of our runtimes the running engine does not have
  local have
  have=$("$DOCKER" info --format '{{range $name, $_ := .Runtimes}}{{$name}} {{end}}')
  for name in $(python3 -c 'import json, sys; print(*json.load(open(sys.argv[1])))' "$RUNTIMES"); do
    case " $have " in *" $name "*) ;; *) printf '%s ' "$name" ;; esac
  done
}

# gVisor's runsc as Docker runtimes (isolation="gvisor"), merged into daemon.json before
# dockerd reads it. Not by SIGHUP: a reload that adds runtimes drops dockerd's built-in
# io.containerd.runc.v2 alias until a restart (measured), so a running engine without
# them is restarted once (its containers stop).
changed=$(python3 scripts/docker-runtimes.py /etc/docker/daemon.json "$RUNTIMES")
[ "$changed" = changed ] && log "registered the gVisor runtimes in /etc/docker/daemon.json"
if "$DOCKER" info >/dev/null 2>&1; then
  missing=$(runtimes_missing)
  if [ -n "$missing" ] || [ "$changed" = changed ]; then
    log "restarting dockerd once so that it reads its runtimes (${missing:-changed arguments})"
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker 2>/dev/null; then
      systemctl restart docker
    else
      pid=$(cat /var/run/docker.pid 2>/dev/null || pgrep -xo dockerd || true)
      [ -n "$pid" ] || { log "dockerd answers but its pid is unknown: restart it yourself"; exit 1; }
      kill -TERM "$pid"
      for _ in $(seq 1 120); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -0 "$pid" 2>/dev/null && { log "dockerd ($pid) did not stop"; exit 1; }
      start_dockerd
    fi
  fi
else
  start_dockerd
fi
missing=$(runtimes_missing)
[ -z "$missing" ] || { log "dockerd lacks the runtimes $missing after reading /etc/docker/daemon.json"; exit 1; }

if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.execbox-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log "installing execbox into .venv"
  if ! .venv/bin/pip install -q --disable-pip-version-check -e '.[dev]' >/tmp/execbox-pip.log 2>&1; then
    grep -v "^WARNING: Location" /tmp/execbox-pip.log | tail -30 >&2
    exit 1
  fi
  touch "$stamp"
fi

# Each build shows its steps (a live bar on a terminal) on stderr; every line goes to its log.
log "sandbox images (cached by recipe hash; the first build takes about 2 minutes)"
if ! .venv/bin/execbox images build --log /tmp/execbox-images-build.log >/tmp/execbox-images-build.out; then
  tail -30 /tmp/execbox-images-build.log >&2
  exit 1
fi
log "sandbox image: $(tail -1 /tmp/execbox-images-build.out)"

log "package images from images/*.toml (cached by spec hash)"
if ! .venv/bin/execbox images build --log /tmp/execbox-package-images-build.log images/*.toml \
    >/tmp/execbox-package-images-build.out; then
  tail -30 /tmp/execbox-package-images-build.log >&2
  exit 1
fi
sed 's/^/[setup] /' /tmp/execbox-package-images-build.out >&2
