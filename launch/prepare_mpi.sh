#!/usr/bin/env bash
# prepare_mpi.sh CONFIG NP [HOSTFILE] [section.field=value ...]: the prepare stage under mpirun
# (mpi4py finds the ranks).
# HOSTFILE is the same `name slots=N` file the deepspeed launcher reads; mpirun (MPICH's hydra, from
# the venv) starts the ranks over ssh, filling each host's slots in order, and forwards this shell's
# environment to every rank. Each rank also runs a local process pool (data.workers), so give each
# node one slot here.
set -euo pipefail
cd "$(dirname "$0")/.."
config=$1; np=$2; hostfile=${3:-}; shift 3 || shift $#
sets=()
for item in "$@"; do sets+=(--set "$item"); done
venv=${VENV:-.venv}
source launch/accelerator.sh
extra=()
if [ -n "$hostfile" ]; then
    # a bad hostfile is one line and exit 2 here, before mpirun reads it
    listed=$("$venv/bin/python" -m pipeline hostfile "$hostfile") || exit $?
    extra+=(-hosts "$(echo "$listed" | awk '{print $1 ":" $2}' | paste -sd, -)")
fi
exec "$venv/bin/mpirun" -n "$np" "${extra[@]}" "$(cd "$venv/bin" && pwd)/python" -m pipeline prepare --config "$config" "${sets[@]}"
