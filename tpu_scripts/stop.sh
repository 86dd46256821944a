#!/usr/bin/env bash
# Stops the experiments running on every worker; they save a checkpoint first.
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<HELP
Usage: $0 --name=NAME --zone=ZONE

Sends SIGTERM to the jaxlm experiments on all workers: they agree on a step, save a checkpoint
there and exit; launching the same command again resumes from it.
$COMMON_HELP
HELP
}

parse_common_flags "$@"
on_workers all "pkill -TERM -f 'python3 -m experiments[.]' || true"
