#!/usr/bin/env bash
# A test bed of several Docker Engines on this one machine, each in a network namespace of
# its own, for trying a cluster of execbox nodes locally (and for tests/test_cluster_bed.py).
#
#   scripts/cluster-bed.sh up [N]    # N engines (default 3): sockets /run/execbox-bed/nI/docker.sock
#   scripts/cluster-bed.sh down      # stop them and remove everything the bed made
#
# Each engine: `nsenter --net=/run/netns/execbox-bed-nI dockerd` with its own data root, exec
# root, pidfile, socket, cgroup parent and key (daemon.json), and a veth into a hub namespace
# (198.18.0.0/24: the engines are .11, .12, ...). The sandbox image is copied from the main engine
# (docker save | load). One more veth joins this (root) namespace to the hub as 198.18.0.254
# (`execbox-bed0`): what runs here (Redis, the API, test servers) is reachable from the engines'
# namespaces at that address. Run a node as its host would, in its engine's namespace:
#   nsenter --net=/run/netns/execbox-bed-n1 execbox node --queue-url redis://198.18.0.254:PORT/0 \
#     --engine-url unix:///run/execbox-bed/n1/docker.sock --name n1
# Besides that link, nothing in the root namespace is touched but /run/netns, /run/execbox-bed and
# /var/lib/execbox-bed.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=/run/execbox-bed
DATA=/var/lib/execbox-bed
HUB=execbox-bed-hub
log() { printf '[bed] %s\n' "$*" >&2; }

down() {
  for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep '^execbox-bed-n' || true); do
    n=${ns#execbox-bed-}
    pid=$(cat "$RUN/$n/docker.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      kill -TERM "$pid" || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
    # What a killed engine leaves: its containerd, shims and container processes (all in its cgroup).
    for ctl in /sys/fs/cgroup/*/execbox-bed-$n /sys/fs/cgroup/execbox-bed-$n; do
      [ -d "$ctl" ] || continue
      { find "$ctl" -name cgroup.procs -exec cat {} + 2>/dev/null || true; } | xargs -r kill -KILL 2>/dev/null || true
    done
    pkill -KILL -f -- "--exec-root $RUN/$n/exec" 2>/dev/null || true
    pkill -KILL -f -- "$RUN/$n/exec/containerd" 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  ip netns del "$HUB" 2>/dev/null || true
  ip link del execbox-bed0 2>/dev/null || true
  # Mounts under the bed's roots, deepest first; then the stale shim sockets and cgroup dirs.
  for root in $DATA $RUN; do
    { grep -o " $root[^ ]*" /proc/self/mounts 2>/dev/null || true; } | sort -r | while read -r m; do
      umount -l "$m" 2>/dev/null || true
    done
  done
  { grep -l "$RUN\|$DATA" /run/containerd/s/* 2>/dev/null || true; } | xargs -r rm -f
  for d in $({ find /sys/fs/cgroup -maxdepth 2 -type d -name 'execbox-bed-n*' 2>/dev/null || true; } | sort -r); do
    find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  rm -rf "$RUN" "$DATA"
}

up() {
  local count=${1:-3}
  down
  local image
  image=$(.venv/bin/python -c 'from execbox.images import default_image; print(default_image())')
  mkdir -p "$RUN" "$DATA" /run/netns
  ip netns add "$HUB"
  ip -n "$HUB" link add br0 type bridge
  ip -n "$HUB" addr add 198.18.0.1/24 dev br0
  ip -n "$HUB" link set br0 up
  ip -n "$HUB" link set lo up
  ip link add execbox-bed0 type veth peer name vroot netns "$HUB"
  ip -n "$HUB" link set vroot master br0 up
  ip addr add 198.18.0.254/24 dev execbox-bed0
  ip link set execbox-bed0 up
  for i in $(seq 1 "$count"); do
    n=n$i
    ns=execbox-bed-$n
    ip netns add "$ns"
    ip -n "$HUB" link add "vh$i" type veth peer name eth0 netns "$ns"
    ip -n "$HUB" link set "vh$i" master br0 up
    ip -n "$ns" addr add "198.18.0.$((10 + i))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    mkdir -p "$RUN/$n/exec" "$DATA/$n"
    printf '{"deprecated-key-path": "%s"}\n' "$RUN/$n/key.json" >"$RUN/$n/daemon.json"
    setsid nsenter --net="/run/netns/$ns" dockerd \
      --config-file "$RUN/$n/daemon.json" --data-root "$DATA/$n" --exec-root "$RUN/$n/exec" \
      --pidfile "$RUN/$n/docker.pid" -H "unix://$RUN/$n/docker.sock" --cgroup-parent "/execbox-bed-$n" \
      --shutdown-timeout 3 >"$RUN/$n/dockerd.log" 2>&1 </dev/null &
  done
  for i in $(seq 1 "$count"); do
    sock=$RUN/n$i/docker.sock
    for _ in $(seq 1 150); do /usr/bin/docker -H "unix://$sock" info >/dev/null 2>&1 && break; sleep 0.2; done
    /usr/bin/docker -H "unix://$sock" info >/dev/null 2>&1 || { tail -20 "$RUN/n$i/dockerd.log" >&2; log "engine n$i did not start"; exit 1; }
  done
  log "copying $image to $count engines"
  /usr/bin/docker save "$image" -o "$RUN/image.tar"
  local loads=()
  for i in $(seq 1 "$count"); do
    /usr/bin/docker -H "unix://$RUN/n$i/docker.sock" load -q -i "$RUN/image.tar" >/dev/null &
    loads+=($!)
  done
  wait "${loads[@]}"  # not the engines: they run on
  rm -f "$RUN/image.tar"
  for i in $(seq 1 "$count"); do echo "unix://$RUN/n$i/docker.sock"; done
}

case "${1:-}" in
  up) up "${2:-3}" ;;
  down) down ;;
  *) echo "usage: $0 up [N] | down" >&2; exit 2 ;;
esac
