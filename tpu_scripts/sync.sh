#!/usr/bin/env bash
# Copies this checkout (with uncommitted edits; not .git, .venv or runs/) to ~/jaxlm on every worker.
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<HELP
Usage: $0 --name=NAME --zone=ZONE

Copies this checkout (not .git, .venv or runs/) to ~/jaxlm on every worker of the TPU VM.
$COMMON_HELP
HELP
}

parse_common_flags "$@"
location_flags

repo="$(cd "$(dirname "$0")/.." && pwd)"
archive="${TMPDIR:-/tmp}/jaxlm-$NAME.tar.gz"
run tar -czf "$archive" -C "$repo" --exclude=.git --exclude=.venv --exclude=runs \
  --exclude=__pycache__ .
run gcloud compute tpus tpu-vm scp "$archive" "$NAME:jaxlm.tar.gz" "${LOCATION[@]}" --worker=all
on_workers all 'mkdir -p ~/jaxlm && tar -xzf ~/jaxlm.tar.gz -C ~/jaxlm'
