#!/usr/bin/env bash
# prepare_mpi.sh CONFIG NP [HOSTFILE]: the prepare stage under mpirun (mpi4py finds the ranks).
# Each rank also runs a local process pool (data.workers), so use one rank per node.
set -euo pipefail
cd "$(dirname "$0")/.."
config=$1; np=$2; hostfile=${3:-}
venv=${VENV:-.venv}
extra=()
[ -n "$hostfile" ] && extra+=(-f "$hostfile")
exec "$venv/bin/mpirun" -n "$np" "${extra[@]}" "$venv/bin/python" -m pipeline prepare --config "$config"
