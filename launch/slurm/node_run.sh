#!/usr/bin/env bash
# One node's task of a SLURM training job (train.sbatch starts it with srun, one per node):
#     node_run.sh LAUNCHER [ARGS...]        e.g. node_run.sh torchrun --nnodes 4 ... launch/train.py ...
# runs the launcher and relays a preemption signal to every training process under it.
#
# Why a relay: a launcher that gets SIGUSR1 dies of it (python's default action), and SLURM then kills
# the rest of the step, workers in the middle of their checkpoint included; torchrun starts workers in
# new sessions, so a signal to the process group misses them. So the launcher starts with SIGUSR1
# ignored (inherited by every process it starts; the trainer's PreemptionHandler installs its own
# handler over that), and on SIGUSR1 or SIGTERM this script sends SIGUSR1 to every process below it,
# again every PREEMPT_RESEND_S seconds (default 15) until the launcher exits: a worker that was still
# starting up (handler not yet installed) gets it at its next resend. The trainer finishes its step,
# saves a complete checkpoint and returns; the launcher then exits normally.
# Exit status: the launcher's.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
SLURM_LOG_TAG="node_run ${SLURM_NODEID:-?}"

if (($# == 0)); then
    echo "usage: node_run.sh LAUNCHER [ARGS...]" >&2
    exit 2
fi
resend_s=${PREEMPT_RESEND_S:-15}
preempted=0
last_relay=
child=

relay() {
    [[ -n $child ]] || return 0 # signal before the launcher started: relayed by the first tick
    local pid
    # shellcheck disable=SC2046
    for pid in "$child" $(descendant_pids "$child"); do
        kill -USR1 "$pid" 2>/dev/null
    done
    last_relay=$SECONDS
}

on_signal() {
    if ((!preempted)); then
        slurm_log "received SIG$1: relaying SIGUSR1 to the training processes"
        preempted=1
        relay
    fi
}

tick() {
    if ((preempted)) && [[ -z $last_relay || $((SECONDS - last_relay)) -ge $resend_s ]]; then
        relay
    fi
    return 0
}

trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
(
    trap '' USR1
    exec "$@"
) &
child=$!
((preempted)) && relay
wait_child "$child" tick
