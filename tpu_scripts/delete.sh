#!/usr/bin/env bash
# Deletes the TPU VM (or its queued resource). Files in the bucket stay.
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<HELP
Usage: $0 --name=NAME --zone=ZONE [--queued]

Deletes the TPU VM; with --queued, the queued resource that created it.
$COMMON_HELP
HELP
}

QUEUED=0
for arg in "$@"; do
  common_flag "$arg" && continue
  case "$arg" in
    --queued) QUEUED=1 ;;
    *) die "unknown flag $arg (see --help)" ;;
  esac
done
require_common
location_flags
if [[ "$QUEUED" == 1 ]]; then
  run gcloud compute tpus queued-resources delete "$NAME" "${LOCATION[@]}" --force --quiet
else
  run gcloud compute tpus tpu-vm delete "$NAME" "${LOCATION[@]}" --quiet
fi
