#!/usr/bin/env bash
# Runs `jaxground train` on every worker of a Cloud TPU VM slice (one process per host). JAXGROUND_MULTIHOST=1
# makes jaxground start jax.distributed, which finds the other hosts through the TPU metadata server (no
# environment variable marks a Cloud TPU VM slice). Installs the checkout on each worker first unless --no-install.
#
#   bash launch/tpu_vm.sh --tpu NAME --zone ZONE [--project P] [--repo URL] [--ref BRANCH] [--dir DIR] \
#       [--data-path GCS_OR_LOCAL] [--no-install] -- --config configs/nextchat_7b_stage1.py --workdir /mnt/bucket/runs/... k=v
#
# The paper-scale configs read datasets under `data/` of the checkout (jaxground/train/defaults.py DATA_ROOT);
# --data-path DIR links `data` to DIR on every worker (a local disk copy or a mounted bucket, the same path on
# all workers). The workdir must be one file system path seen by every worker (a bucket mounted with gcsfuse).
set -euo pipefail
TPU="" ZONE="" PROJECT="" REPO="" REF="main" DIR="jaxground" DATA_PATH="" INSTALL=1
while [ $# -gt 0 ]; do
  case "$1" in
    --tpu) TPU="$2"; shift 2 ;;
    --zone) ZONE="$2"; shift 2 ;;
    --project) PROJECT="$2"; shift 2 ;;
    --repo) REPO="$2"; shift 2 ;;
    --ref) REF="$2"; shift 2 ;;
    --dir) DIR="$2"; shift 2 ;;
    --data-path) DATA_PATH="$2"; shift 2 ;;
    --no-install) INSTALL=0; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1 (train arguments go after --)"; exit 2 ;;
  esac
done
[ -n "$TPU" ] && [ -n "$ZONE" ] || { echo "need --tpu NAME and --zone ZONE"; exit 2; }
[ $# -gt 0 ] || { echo "need train arguments after --, e.g. -- --config configs/nextchat_7b_stage1.py"; exit 2; }
Q_DIR=$(printf %q "$DIR") Q_REPO=$(printf %q "$REPO") Q_REF=$(printf %q "$REF")  # quoted for the remote shell
GCLOUD=(gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all)
[ -n "$PROJECT" ] && GCLOUD+=(--project "$PROJECT")

if [ "$INSTALL" = 1 ]; then
  [ -n "$REPO" ] || { echo "--repo URL is needed to install (or pass --no-install)"; exit 2; }
  # any failing step stops the install: a --ref that does not exist must not leave the old checkout training
  # (a branch is fast-forwarded to its remote; a tag or commit is checked out as it is)
  "${GCLOUD[@]}" --command "set -e; [ -d $Q_DIR ] || git clone -q $Q_REPO $Q_DIR; cd $Q_DIR; git fetch -q --tags; \
    git checkout -q $Q_REF; if git symbolic-ref -q HEAD > /dev/null; then git merge -q --ff-only '@{upstream}'; fi; \
    python3 -m venv .venv; .venv/bin/pip install -q -U pip; .venv/bin/pip install -q -e . 'jax[tpu]==0.10.2'"
fi
if [ -n "$DATA_PATH" ]; then
  "${GCLOUD[@]}" --command "cd $Q_DIR && ln -sfn $(printf %q "$DATA_PATH") data"
fi
ARGS=$(printf ' %q' "$@")
"${GCLOUD[@]}" --command "cd $Q_DIR && JAXGROUND_MULTIHOST=1 .venv/bin/jaxground train$ARGS"
