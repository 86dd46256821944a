#!/usr/bin/env bash
# Shows (or follows) one worker's log of a run.
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<HELP
Usage: $0 --name=NAME --zone=ZONE --run=RUN [--worker=0] [--lines=50] [--follow]

Prints the end of ~/logs/RUN.log on one worker (0 writes the progress lines; the others
only warnings and errors), or all of them with --worker=all.
  --worker=N|all   which worker (default 0)
  --lines=N        how many lines (default 50)
  --follow         keep printing new lines (tail -f)
$COMMON_HELP
HELP
}

RUN="" WORKER=0 LINES=50 FOLLOW=""
for arg in "$@"; do
  common_flag "$arg" && continue
  case "$arg" in
    --run=*) RUN="${arg#*=}" ;;
    --worker=*) WORKER="${arg#*=}" ;;
    --lines=*) LINES="${arg#*=}" ;;
    --follow) FOLLOW=" -f" ;;
    *) die "unknown flag $arg (see --help)" ;;
  esac
done
require_common
[[ "$RUN" =~ ^[A-Za-z0-9._-]+$ ]] || die "--run=NAME is required"
[[ "$WORKER" =~ ^([0-9]+|all)$ ]] || die "--worker must be a number or all"
[[ "$LINES" =~ ^[0-9]+$ ]] || die "--lines must be a number"
on_workers "$WORKER" "tail -n $LINES$FOLLOW ~/logs/$RUN.log"
