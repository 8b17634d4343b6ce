#!/usr/bin/env bash
# One host, any device count. Runs `python -m ctgen ARGS...` in one process, or in N processes
# joined by jax.distributed on localhost (e.g. one process per GPU, or a multi-process CPU test).
#
#   launch/local.sh [-n PROCESSES] [-d CPU_DEVICES] [-g] -- train --config configs/toy.py:tiny --workdir /tmp/w
#
#   -n N   processes (default 1); N>1 adds --distributed and a localhost coordinator
#   -d D   emulate D CPU devices per process (XLA_FLAGS), for testing meshes without accelerators
#   -g     pin process i to GPU i (CUDA_VISIBLE_DEVICES=i)
# Environment: PYTHON (default python3), CTGEN_PORT (default 12355), DRY_RUN=1 prints the commands.
set -euo pipefail

usage() { sed -n '2,12p' "$0" >&2; exit 2; }

procs=1 cpu_devices="" pin_gpus=0
while getopts "n:d:gh" opt; do
  case "$opt" in
    n) procs="$OPTARG" ;;
    d) cpu_devices="$OPTARG" ;;
    g) pin_gpus=1 ;;
    *) usage ;;
  esac
done
shift $((OPTIND - 1))
[ "${1:-}" = "--" ] && shift
[ $# -gt 0 ] || { echo "local.sh: no ctgen arguments given after --" >&2; usage; }
[[ "$procs" =~ ^[1-9][0-9]*$ ]] || { echo "local.sh: -n must be a positive integer, got '$procs'" >&2; exit 2; }
[ -z "$cpu_devices" ] || [[ "$cpu_devices" =~ ^[1-9][0-9]*$ ]] || {
  echo "local.sh: -d must be a positive integer, got '$cpu_devices'" >&2; exit 2; }

PYTHON=${PYTHON:-python3}
PORT=${CTGEN_PORT:-12355}
DRY_RUN=${DRY_RUN:-0}

run_one() {  # run_one PROCESS_ID ARGS...
  local pid=$1; shift
  local env=()
  [ -n "$cpu_devices" ] && env+=("XLA_FLAGS=--xla_force_host_platform_device_count=$cpu_devices")
  [ "$pin_gpus" = 1 ] && env+=("CUDA_VISIBLE_DEVICES=$pid")
  if [ "$procs" -gt 1 ]; then
    env+=("CTGEN_DISTRIBUTED=1" "CTGEN_COORDINATOR_ADDRESS=127.0.0.1:$PORT"
          "CTGEN_NUM_PROCESSES=$procs" "CTGEN_PROCESS_ID=$pid")
  fi
  if [ "$DRY_RUN" = 1 ]; then
    printf '%q ' env "${env[@]}" "$PYTHON" -m ctgen "$@"; echo
  else
    env "${env[@]}" "$PYTHON" -m ctgen "$@"
  fi
}

if [ "$procs" = 1 ] || [ "$DRY_RUN" = 1 ]; then
  for ((i = 0; i < procs; i++)); do run_one "$i" "$@"; done
  exit 0
fi

pids=()
for ((i = 0; i < procs; i++)); do
  run_one "$i" "$@" &
  pids+=($!)
done
# First failure (other than a clean preemption, 75) stops the others: they would wait forever
# for a peer that is gone.
status=0
for ((i = 0; i < procs; i++)); do
  rc=0
  wait -n || rc=$?
  if [ "$rc" != 0 ]; then
    [ "$status" = 0 ] && status=$rc
    [ "$rc" != 75 ] && kill "${pids[@]}" 2>/dev/null || true
  fi
done
exit "$status"
