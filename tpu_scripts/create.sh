#!/usr/bin/env bash
# Creates a TPU VM (or a queued resource, which waits for capacity).
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<HELP
Usage: $0 --name=NAME --zone=ZONE --type=ACCELERATOR [--version=RUNTIME] [--spot] [--queued]

Creates a TPU VM, e.g. --type=v5litepod-16 (4 hosts) or --type=v4-32.
  --type=TYPE      accelerator type (required)
  --version=V      TPU software version (default: the one for the type's generation)
  --spot           preemptible capacity (jaxlm checkpoints on SIGTERM and resumes)
  --queued         create through a queued resource, which waits for capacity
$COMMON_HELP
HELP
}

TYPE="" VERSION="" SPOT=0 QUEUED=0
for arg in "$@"; do
  common_flag "$arg" && continue
  case "$arg" in
    --type=*) TYPE="${arg#*=}" ;;
    --version=*) VERSION="${arg#*=}" ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    *) die "unknown flag $arg (see --help)" ;;
  esac
done
require_common
[[ -n "$TYPE" ]] || die "--type is required, e.g. --type=v5litepod-16"
if [[ -z "$VERSION" ]]; then
  case "$TYPE" in
    v4-*) VERSION=tpu-ubuntu2204-base ;;
    v5litepod-*) VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    *) die "no default --version for --type=$TYPE; give one" ;;
  esac
fi
location_flags

if [[ "$QUEUED" == 1 ]]; then
  command=(gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME" "${LOCATION[@]}"
           --accelerator-type="$TYPE" --runtime-version="$VERSION")
else
  command=(gcloud compute tpus tpu-vm create "$NAME" "${LOCATION[@]}"
           --accelerator-type="$TYPE" --version="$VERSION")
fi
if [[ "$SPOT" == 1 ]]; then command+=(--spot); fi
run "${command[@]}"
