#!/usr/bin/env bash
# Starts one experiment on every worker at once; each worker logs to ~/logs/RUN.log.
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<HELP
Usage: $0 --name=NAME --zone=ZONE --run=RUN [--experiment=pretrain] -- [experiment flags]

Runs python -m experiments.EXPERIMENT --multiprocess on all workers (one process per host;
jax.distributed finds the others), in the background; worker i logs to ~/logs/RUN.log on
that worker (logs.sh reads them). Flags after -- go to the experiment, e.g.
  -- --config=experiments/configs/gpt2_124m.py --workdir=/gcs/BUCKET/runs/RUN
  --run=RUN              a name for the logs
  --experiment=MODULE    pretrain (default), sft, reward_model, rl, dpo, pipeline, benchmark
$COMMON_HELP
HELP
}

RUN="" EXPERIMENT="pretrain"
while [[ $# -gt 0 ]]; do
  arg="$1"
  shift
  if [[ "$arg" == "--" ]]; then break; fi
  common_flag "$arg" && continue
  case "$arg" in
    --run=*) RUN="${arg#*=}" ;;
    --experiment=*) EXPERIMENT="${arg#*=}" ;;
    *) die "unknown flag $arg (see --help; experiment flags go after --)" ;;
  esac
done
require_common
[[ "$RUN" =~ ^[A-Za-z0-9._-]+$ ]] || die "--run=NAME is required (letters, digits, . _ -)"
[[ "$EXPERIMENT" =~ ^[a-z_]+$ ]] || die "--experiment must be a module of experiments/"

experiment_flags="$(printf '%q ' "$@")"
on_workers all "mkdir -p ~/logs && cd ~/jaxlm && \
nohup python3 -m experiments.$EXPERIMENT --multiprocess ${experiment_flags% } \
> ~/logs/$RUN.log 2>&1 < /dev/null &"
