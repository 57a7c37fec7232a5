#!/usr/bin/env bash
# A real one-node Slurm cluster on this host, by hand (the tests start their own: tests/slurm_cluster.py).
#   scripts/slurm_cluster.sh up       # apt-get what is missing (root), start munged, MariaDB, slurmdbd,
#                                     # slurmctld, slurmd; prints `export SLURM_CONF=...` (eval it)
#   scripts/slurm_cluster.sh status   # daemons, sinfo, squeue
#   scripts/slurm_cluster.sh down     # cancel every job, stop the daemons `up` started, by PID
# Folder: $MIM_SLURM_DIR (default /tmp/mim-slurm). While it is up, pytest's slurm tests use it and leave it up.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" -m tests.slurm_cluster "${1:-status}" "${@:2}"
