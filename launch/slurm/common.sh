# Shared helpers of the SLURM launch scripts (sourced by train.sbatch and node_run.sh).
# Plain functions of their arguments and the SLURM environment, so tests can call them one by one.

# Hostnames of the job's nodes, one per line, in SLURM's order (the first is the master).
slurm_hostnames() {
    scontrol show hostnames "${SLURM_JOB_NODELIST:?not inside a SLURM allocation (SLURM_JOB_NODELIST unset)}"
}

# write_hostfile FILE SLOTS HOST... : a DeepSpeed hostfile, one "host slots=N" line per node.
write_hostfile() {
    local file=$1 slots=$2 host
    shift 2
    : >"$file" || return 1
    for host in "$@"; do
        printf '%s slots=%s\n' "$host" "$slots" >>"$file"
    done
}

# job_master_port JOB_ID : the rendezvous port of a job. Derived from the job id so two jobs sharing a
# node do not collide and every node of one job computes the same port without talking; kept in
# 10000-29999, below Linux's ephemeral range (32768+), where outgoing connections take their ports.
job_master_port() {
    echo $((10000 + $1 % 20000))
}

# descendant_pids PID : every process below PID (children of children included), from one ps snapshot.
# torchrun starts each worker in a new session, so signalling a process group would miss them.
descendant_pids() {
    ps -e -o pid= -o ppid= | awk -v root="$1" '
        { parent[$1] = $2 }
        END {
            for (p in parent) {
                q = parent[p]
                while (q != root && (q in parent)) q = parent[q]
                if (q == root) print p
            }
        }'
}

# wait_child PID TICK : wait for background child PID and return its exit status.
# A trapped signal interrupts bash's `wait`; while the child still runs after that, it is polled once a
# second and the function TICK is called each time (signal traps only set flags; TICK acts on them).
# TICK returning nonzero stops the wait early (return status 124; the caller knows why it gave up).
wait_child() {
    local pid=$1 tick=$2 status again
    wait "$pid"
    status=$?
    while kill -0 "$pid" 2>/dev/null; do
        "$tick" || return 124
        sleep 1 &
        wait $!
    done
    # If the first wait was interrupted, the exit status is still to be collected; if it was not, the
    # status was consumed and bash answers 127 (not a child).
    wait "$pid" 2>/dev/null
    again=$?
    ((again != 127)) && status=$again
    return "$status"
}

slurm_log() {
    printf '[%s %s] %s\n' "$(date -u +%FT%TZ)" "${SLURM_LOG_TAG:-slurm}" "$*" >&2
}
