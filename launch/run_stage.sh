#!/usr/bin/env bash
# run_stage.sh COMMAND CONFIG [HOSTFILE] [--set a.b=c ...]
# Without a hostfile: one process. With one: the deepspeed launcher, one rank per slot.
# A hostfile that names only this machine needs no ssh, and rendezvous stays on 127.0.0.1.
# Otherwise DeepSpeed's multi-node runner (pdsh over ssh; LAUNCHER=mpich for mpirun) starts the
# ranks; MASTER_ADDR / MASTER_PORT, when set, name the rendezvous (else the first host's
# `hostname -I` and 29500). The variables remote ranks need travel in DeepSpeed's env file
# (launch/supervise.py writes it).
# The launcher runs under launch/supervise.py: a stop signal sent to this command reaches every
# rank (they save and exit 75), and no process outlives it.
set -euo pipefail
cd "$(dirname "$0")/.."
command=$1; config=$2; hostfile=${3:-}; shift 3 || shift $#
venv=${VENV:-.venv}
source launch/accelerator.sh
args=("$command")
[ -n "$config" ] && args+=(--config "$config")
for item in "$@"; do args+=(--set "$item"); done

if [ -z "$hostfile" ]; then
    exec "$venv/bin/python" -m pipeline "${args[@]}"
fi
# a bad hostfile is one line and exit 2 here, before any launcher reads it
listed=$("$venv/bin/python" -m pipeline hostfile "$hostfile") || exit $?
hosts=$(echo "$listed" | awk '{print $1}')
if [ "$hosts" = "localhost" ] || [ "$hosts" = "127.0.0.1" ] || [ "$hosts" = "$(hostname)" ] \
    || [ "$hosts" = "$(hostname -s)" ]; then
    port=${MASTER_PORT:-$((29500 + RANDOM % 1000))}
    exec "$venv/bin/python" launch/supervise.py "$venv/bin/deepspeed" --hostfile "$hostfile" --no_ssh_check \
        --master_addr 127.0.0.1 --master_port "$port" --module pipeline "${args[@]}"
fi
# what DeepSpeed's runner would fail on with a traceback (or only for the first host): one line each
if [ -z "${LAUNCHER:-}" ] || [ "$LAUNCHER" = pdsh ]; then
    command -v pdsh >/dev/null || { echo "error: pdsh is not installed on $(hostname): the deepspeed launcher starts" \
        "the other hosts' ranks with it (apt-get install pdsh), or set LAUNCHER=mpich" >&2; exit 2; }
fi
for host in $hosts; do
    if ! said=$(ssh -o BatchMode=yes -o ConnectTimeout=10 "$host" true 2>&1 </dev/null); then
        echo "error: hostfile $hostfile: $(hostname) cannot ssh to $host without a password" \
            "(ssh: $(echo "$said" | tr -d '\r' | tail -n 1)); every host must reach every other by these names" >&2
        exit 2
    fi
done
launcher=()
entry=(--module pipeline)
if [ -n "${LAUNCHER:-}" ]; then
    launcher+=(--launcher "$LAUNCHER")
    # DeepSpeed's MPI runners mangle --module (see launch/rank.py)
    [ "$LAUNCHER" != pdsh ] && entry=("$(pwd)/launch/rank.py")
fi
[ -n "${MASTER_ADDR:-}" ] && launcher+=(--master_addr "$MASTER_ADDR")
[ -n "${MASTER_PORT:-}" ] && launcher+=(--master_port "$MASTER_PORT")
# mpich's mpirun is the venv's (pip mpich): on PATH for DeepSpeed's runner to find
export PATH="$(cd "$venv/bin" && pwd):$PATH"
exec "$venv/bin/python" launch/supervise.py "$venv/bin/deepspeed" --hostfile "$hostfile" "${launcher[@]}" \
    "${entry[@]}" "${args[@]}"
