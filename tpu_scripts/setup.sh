#!/usr/bin/env bash
# Copies jaxlm to every worker, installs it, and mounts the bucket where runs keep their files.
# shellcheck source=SCRIPTDIR/lib.sh
source "$(dirname "$0")/lib.sh"

usage() {
  cat <<HELP
Usage: $0 --name=NAME --zone=ZONE --bucket=BUCKET

Syncs the code (sync.sh), installs jaxlm with its TPU extras on every worker, and mounts
gs://BUCKET at /gcs/BUCKET with gcsfuse, so that workdirs (checkpoints, TensorBoard logs,
metrics) and TFDS data_dirs under /gcs/BUCKET live in the bucket.
  --bucket=BUCKET  a bucket in the TPU's region, without gs://
$COMMON_HELP
HELP
}

BUCKET=""
passed=()
for arg in "$@"; do
  if common_flag "$arg"; then passed+=("$arg"); continue; fi
  case "$arg" in
    --bucket=*) BUCKET="${arg#*=}" ;;
    *) die "unknown flag $arg (see --help)" ;;
  esac
done
require_common
[[ -n "$BUCKET" ]] || die "--bucket is required (a bucket name, without gs://)"

"$(dirname "$0")/sync.sh" "${passed[@]}"
on_workers all "pip install -q -e ~/jaxlm[tpu] && \
(command -v gcsfuse >/dev/null || (export GCSFUSE_REPO=gcsfuse-\$(lsb_release -c -s) && \
echo \"deb https://packages.cloud.google.com/apt \$GCSFUSE_REPO main\" | \
sudo tee /etc/apt/sources.list.d/gcsfuse.list && \
curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && \
sudo apt-get update -q && sudo apt-get install -y -q gcsfuse)) && \
sudo mkdir -p /gcs/$BUCKET && sudo chown \$USER /gcs/$BUCKET && \
(mountpoint -q /gcs/$BUCKET || gcsfuse --implicit-dirs $BUCKET /gcs/$BUCKET)"
