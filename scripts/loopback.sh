#!/usr/bin/env bash
# Runs a command in a new network namespace whose only interface is loopback (brought up).
# Ray's servers bind every interface and may advertise a non-loopback address; inside this
# namespace "every interface" is 127.0.0.1/::1, so tests and demos cannot reach the network.
# Needs root or unprivileged user namespaces. Usage: scripts/loopback.sh CMD [ARGS...]
# `scripts/loopback.sh --check` exits 0 when it can make a namespace here, 1 when it cannot.
set -euo pipefail
if [ "${1:-}" = --check ]; then
  unshare -n true 2>/dev/null || unshare -rn true 2>/dev/null; exit
fi
if [ "${LOOPBACK_NS:-}" = 1 ]; then exec "$@"; fi   # already inside one
if unshare -n true 2>/dev/null; then
  exec unshare -n bash -c 'ip link set lo up && LOOPBACK_NS=1 exec "$@"' bash "$@"
elif unshare -rn true 2>/dev/null; then
  exec unshare -rn bash -c 'ip link set lo up && LOOPBACK_NS=1 exec "$@"' bash "$@"
fi
echo "note: cannot create a loopback-only network namespace here; running with 127.0.0.1 only" >&2
exec "$@"
