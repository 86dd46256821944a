# shellcheck shell=bash
# Sourced by every tpu_scripts/*.sh: the common flags, and running gcloud (or, with --dry-run,
# only printing the exact commands).
set -euo pipefail

NAME="${JAXLM_TPU_NAME:-}"
ZONE="${JAXLM_TPU_ZONE:-}"
PROJECT="${JAXLM_TPU_PROJECT:-}"
DRY_RUN=0
export COMMON_HELP="Common flags (defaults from JAXLM_TPU_NAME, JAXLM_TPU_ZONE, JAXLM_TPU_PROJECT):
  --name=NAME      the TPU VM (or queued resource)
  --zone=ZONE      e.g. us-central2-b
  --project=ID     the Google Cloud project (default: gcloud's configured one)
  --dry-run        print the gcloud commands without running them
  --help           this text"

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# Consumes a common flag; returns 1 if "$1" is not one.
common_flag() {
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    --help|-h) usage; exit 0 ;;
    *) return 1 ;;
  esac
}

require_common() {
  [[ -n "$NAME" ]] || die "--name is required (or set JAXLM_TPU_NAME)"
  [[ -n "$ZONE" ]] || die "--zone is required (or set JAXLM_TPU_ZONE)"
}

# The flags every gcloud call takes.
location_flags() {
  LOCATION=("--zone=$ZONE")
  if [[ -n "$PROJECT" ]]; then LOCATION+=("--project=$PROJECT"); fi
}

# One shell word: as is when safe, otherwise in single quotes.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# Prints the command as one pasteable line, then runs it unless --dry-run.
run() {
  local line="" arg
  for arg in "$@"; do line+="$(quote "$arg") "; done
  echo "${line% }"
  if [[ "$DRY_RUN" == 0 ]]; then "$@"; fi
}

# Runs a shell command on the given workers ("all" or a number) of the TPU VM.
on_workers() {
  local workers="$1" command="$2"
  location_flags
  run gcloud compute tpus tpu-vm ssh "$NAME" "${LOCATION[@]}" "--worker=$workers" \
    "--command=$command"
}

# For scripts that take only the common flags.
parse_common_flags() {
  local arg
  for arg in "$@"; do
    common_flag "$arg" || die "unknown flag $arg (see --help)"
  done
  require_common
}
