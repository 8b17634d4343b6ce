#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create (or reuse) it, copy this checkout to every worker,
# install, and run the same `python -m ctgen ...` on all workers (--worker=all).
#
#   TPU_NAME=ctgen-v4 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#     launch/tpu_pod.sh -- train --config configs/ctvit.py:paper --workdir /mnt/runs/ctvit
#
# Required: TPU_NAME, ZONE, ACCELERATOR_TYPE (e.g. v4-32, v5litepod-16).
# Optional: PROJECT, RUNTIME_VERSION (default tpu-ubuntu2204-base), SPOT=1 (spot VMs),
#   SETUP_ONLY=1 (create+install, do not train), DRY_RUN=1 (print the gcloud commands only).
# WORKDIR must be visible to every worker (Filestore/NFS, or a gcsfuse-mounted bucket).
# JAX auto-detects the pod's coordinator, process count and ids (CTGEN_DISTRIBUTED=1).
set -euo pipefail

[ "${1:-}" = "--" ] && shift
missing=()
for var in TPU_NAME ZONE ACCELERATOR_TYPE; do
  [ -n "${!var:-}" ] || missing+=("$var")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "tpu_pod.sh: set ${missing[*]} (see the header of $0)" >&2
  exit 2
fi
[ $# -gt 0 ] || [ "${SETUP_ONLY:-0}" = 1 ] || { echo "tpu_pod.sh: give the ctgen arguments after --" >&2; exit 2; }

DRY_RUN=${DRY_RUN:-0}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
gc=(gcloud compute tpus tpu-vm)
where=(--zone "$ZONE")
[ -n "${PROJECT:-}" ] && where+=(--project "$PROJECT")
repo=$(cd "$(dirname "$0")/.." && pwd)

run() {
  if [ "$DRY_RUN" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi
}

if [ "$DRY_RUN" != 1 ]; then
  command -v gcloud >/dev/null || { echo "tpu_pod.sh: gcloud is not installed" >&2; exit 2; }
fi

if [ "$DRY_RUN" = 1 ] || ! "${gc[@]}" describe "$TPU_NAME" "${where[@]}" >/dev/null 2>&1; then
  create=("${gc[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type "$ACCELERATOR_TYPE" --version "$RUNTIME_VERSION")
  [ "${SPOT:-0}" = 1 ] && create+=(--spot)
  run "${create[@]}"
fi

tarball=$(mktemp -t ctgen.XXXXXX.tar.gz)
trap 'rm -f "$tarball"' EXIT
run git -C "$repo" archive --format=tar.gz -o "$tarball" HEAD
run "${gc[@]}" scp "$tarball" "$TPU_NAME:ctgen.tar.gz" "${where[@]}" --worker=all
install='rm -rf ~/ctgen && mkdir -p ~/ctgen && tar xzf ~/ctgen.tar.gz -C ~/ctgen && python3 -m venv ~/ctgen-venv && ~/ctgen-venv/bin/pip install -q -e ~/ctgen "jax[tpu]==0.10.2"'
run "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command "$install"
[ "${SETUP_ONLY:-0}" = 1 ] && exit 0

args=$(printf '%q ' "$@")
train="cd ~/ctgen && CTGEN_DISTRIBUTED=1 ~/ctgen-venv/bin/python -m ctgen $args"
run "${gc[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command "$train"
