"""launch/slurm/: the SLURM batch script, its per-node relay and helpers, on a machine without SLURM.

Fake ``scontrol``, ``srun``, ``torchrun`` and ``deepspeed`` executables on PATH record their argv; the
fake srun runs its command as a child and forwards SIGUSR1 / SIGTERM to it as the real one does; the
fake launchers run a fake worker (in a new session, as torchrun starts its workers) that reports which
signals reached it. The end-to-end test replaces only SLURM: the real torchrun runs the real trainer,
which is preempted by SIGUSR1 to the batch script, saves, is requeued, and the "requeued job" resumes
and finishes.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SLURM = ROOT / "launch" / "slurm"
SBATCH = SLURM / "train.sbatch"
JOB_ID = "4242"
NODELIST = "gpu[001-003]"
HOSTS = ["gpu001", "gpu002", "gpu003"]

FAKE_SCONTROL = r"""#!/usr/bin/env bash
saved=no; [[ -e $FAKE_DIR/worker.saved ]] && saved=yes
printf '%s saved=%s\n' "$*" "$saved" >>"$FAKE_DIR/scontrol.calls"
case $1 in
show) [[ $2 == hostnames && $3 == "$FAKE_NODELIST" ]] || exit 1; printf '%s\n' $FAKE_HOSTS ;;
requeue) exit 0 ;;
*) exit 1 ;;
esac
"""

FAKE_SRUN = r"""#!/usr/bin/env bash
printf '%s\0' "$@" >"$FAKE_DIR/srun.args"
while (($#)) && [[ $1 == -* ]]; do shift; done   # srun's own options
export SLURM_NODEID=0 SLURM_PROCID=0 SLURM_LOCALID=0
"$@" &
child=$!
trap 'echo USR1 >>"$FAKE_DIR/srun.signals"; kill -USR1 $child' USR1
trap 'echo TERM >>"$FAKE_DIR/srun.signals"; kill -TERM $child' TERM
wait $child; st=$?
while kill -0 $child 2>/dev/null; do wait $child; st=$?; done
wait $child 2>/dev/null; again=$?; ((again != 127)) && st=$again
exit $st
"""

# Records its argv, then exits with FAKE_EXIT or runs the fake worker in a new session and returns
# its status (a bash launcher that got SIGUSR1 without it being ignored would die of it: status 138).
FAKE_LAUNCHER = r"""#!/usr/bin/env bash
printf '%s\0' "$@" >"$FAKE_DIR/$(basename "$0").args"
[[ -n ${FAKE_EXIT:-} ]] && exit "$FAKE_EXIT"
setsid "$FAKE_PYTHON" "$FAKE_DIR/worker.py" &
wait $!; st=$?
while kill -0 $! 2>/dev/null; do wait $!; st=$?; done
exit $st
"""

# FAKE_WORKER: "trainer" handles SIGUSR1/SIGTERM like the trainer's PreemptionHandler, "late" installs
# that handler only after 1.5 s (a worker still starting up), "stubborn" never does.
FAKE_WORKER = r"""
import os, signal, sys, time
d, mode = os.environ["FAKE_DIR"], os.environ.get("FAKE_WORKER", "trainer")
got = []
def handle(signum, frame):
    got.append(signal.Signals(signum).name)
with open(os.path.join(d, "worker.info"), "w") as f:
    f.write(f"{os.getpid()} usr1_ignored_at_start={signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN}\n")
if mode == "trainer":
    signal.signal(signal.SIGUSR1, handle); signal.signal(signal.SIGTERM, handle)
open(os.path.join(d, "worker.ready"), "w").close()
start = time.time()
while not got and time.time() - start < float(os.environ.get("FAKE_WORKER_WAIT_S", "30")):
    if mode == "late" and time.time() - start > 1.5 and signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN:
        signal.signal(signal.SIGUSR1, handle)
    time.sleep(0.02)
if not got:
    sys.exit(5)
time.sleep(0.3)  # "finish the step and save"
with open(os.path.join(d, "worker.saved"), "w") as f:
    f.write(" ".join(got))
"""


@pytest.fixture
def fake(tmp_path):
    """A fake SLURM job environment; returns (env, fake_dir)."""
    fake_dir, bin_dir = tmp_path / "fake", tmp_path / "bin"
    fake_dir.mkdir()
    bin_dir.mkdir()
    for name, text in {"scontrol": FAKE_SCONTROL, "srun": FAKE_SRUN, "torchrun": FAKE_LAUNCHER,
                       "deepspeed": FAKE_LAUNCHER}.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    (fake_dir / "worker.py").write_text(FAKE_WORKER)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "PET_", "TORCHELASTIC_")) and k not in (
               "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "DS_CONFIG", "CONFIG",
               "LAUNCHER", "GPUS_PER_NODE", "HOSTFILE", "REQUEUE_ON_FAILURE")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_DIR=str(fake_dir), FAKE_PYTHON=sys.executable,
        FAKE_NODELIST=NODELIST, FAKE_HOSTS=" ".join(HOSTS), SLURM_JOB_ID=JOB_ID, SLURM_JOB_NODELIST=NODELIST,
        SLURM_NNODES="3", SLURM_GPUS_ON_NODE="8", SLURM_SUBMIT_DIR=str(ROOT), HOSTFILE=str(tmp_path / "hostfile"),
        OMP_NUM_THREADS="1", PREEMPT_RESEND_S="1",
    )
    yield env, fake_dir
    info = fake_dir / "worker.info"  # a worker the test left running (the stubborn one)
    if info.exists():
        try:
            os.kill(int(info.read_text().split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _args(path: Path) -> list:
    return path.read_bytes().decode().split("\0")[:-1]


def _calls(fake_dir: Path) -> list:
    path = fake_dir / "scontrol.calls"
    return path.read_text().splitlines() if path.exists() else []


def _requeues(fake_dir: Path) -> list:
    return [c for c in _calls(fake_dir) if c.startswith("requeue")]


def _start(env, *args, log: Path):
    with open(log, "w") as out:
        return subprocess.Popen(["bash", str(SBATCH), *args], cwd=ROOT, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _run(env, *args, tmp_path, timeout=30):
    log = tmp_path / "job.log"
    proc = _start(env, *args, log=log)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        _kill_group(proc)
    return code, log.read_text()


def _kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait_for(predicate, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _bash(script: str, env=None) -> str:
    out = subprocess.run(["bash", "-c", f"source {SLURM / 'common.sh'}\n{script}"], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


# ---------------------------------------------------------------------------------------------- helpers
@pytest.mark.parametrize("script", ["train.sbatch", "node_run.sh", "common.sh"])
def test_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(SLURM / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_sbatch_header_defaults():
    header = [line.split(None, 1)[1] for line in SBATCH.read_text().splitlines() if line.startswith("#SBATCH")]
    for option in ("--ntasks-per-node=1", "--gpus-per-node=8", "--signal=B:USR1@180", "--requeue",
                   "--open-mode=append", "--output=logs/%x-%j.out"):
        assert option in header
    assert any(o.startswith("--nodes=") for o in header)


def test_hostfile_for_three_nodes(fake, tmp_path):
    env, _ = fake
    hostfile = tmp_path / "hf"
    _bash(f'mapfile -t hosts < <(slurm_hostnames); write_hostfile {hostfile} 8 "${{hosts[@]}}"', env)
    assert hostfile.read_text() == "gpu001 slots=8\ngpu002 slots=8\ngpu003 slots=8\n"


def test_master_port_is_a_function_of_the_job_id():
    ports = _bash("for j in 0 1 4242 19999 20000 123456789; do job_master_port $j; done").split()
    assert ports == ["10000", "10001", "14242", "29999", "10000", str(10000 + 123456789 % 20000)]


def test_descendant_pids_reach_processes_in_new_sessions():
    # parent shell -> grandchild in its own session (as torchrun starts workers)
    parent = subprocess.Popen(["bash", "-c", "setsid sleep 30 & echo $!; wait"], stdout=subprocess.PIPE, text=True)
    grandchild = parent.stdout.readline().strip()
    try:
        found = _bash(f"descendant_pids {parent.pid}").split()
        assert grandchild in found and str(parent.pid) not in found
        assert os.getsid(int(grandchild)) != os.getsid(parent.pid)
    finally:
        os.kill(int(grandchild), signal.SIGKILL)
        parent.wait(timeout=10)


# ------------------------------------------------------------------------------------ command lines
def test_torchrun_command_line(fake, tmp_path):
    env, fake_dir = fake
    env.update(FAKE_EXIT="0", CONFIG="configs/toylab_dmd.yaml")
    code, log = _run(env, "run.output_dir=/shared/x", "train.max_steps=7", tmp_path=tmp_path)
    assert code == 0, log
    port = str(10000 + int(JOB_ID) % 20000)
    assert _args(fake_dir / "srun.args") == [
        "--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "launch/slurm/node_run.sh",
        "torchrun", "--nnodes", "3", "--nproc_per_node", "8", "--rdzv_backend", "c10d",
        "--rdzv_endpoint", f"gpu001:{port}", "--rdzv_id", JOB_ID, "launch/train.py",
        "--ds_config", "configs/zero3.json", "--config", "configs/toylab_dmd.yaml",
        "run.output_dir=/shared/x", "train.max_steps=7",
    ]
    assert _args(fake_dir / "torchrun.args") == _args(fake_dir / "srun.args")[6:]
    assert _requeues(fake_dir) == []


def test_deepspeed_command_line_and_hostfile(fake, tmp_path):
    env, fake_dir = fake
    env.update(FAKE_EXIT="0", LAUNCHER="deepspeed", DS_CONFIG="configs/zero2.json", GPUS_PER_NODE="4",
               MASTER_PORT="29123")
    code, log = _run(env, "a.b=1", "--print-config", tmp_path=tmp_path)
    assert code == 0, log
    hostfile = env["HOSTFILE"]
    assert Path(hostfile).read_text() == "".join(f"{h} slots=4\n" for h in HOSTS)
    assert _args(fake_dir / "deepspeed.args") == [
        "--no_ssh", "--node_rank", "0", "--hostfile", hostfile, "--master_addr", "gpu001",
        "--master_port", "29123", "launch/train.py", "--ds_config", "configs/zero2.json", "a.b=1",
        "--print-config",
    ]


def test_bad_launcher_and_missing_slurm_fail_early(fake, tmp_path):
    env, fake_dir = fake
    env.update(LAUNCHER="mpirun")
    code, log = _run(env, tmp_path=tmp_path)
    assert code == 2 and "LAUNCHER must be torchrun or deepspeed, got 'mpirun'" in log
    env.pop("LAUNCHER")
    env.pop("SLURM_JOB_ID")
    code, log = _run(env, tmp_path=tmp_path)
    assert code != 0 and "SLURM_JOB_ID" in log
    assert not (fake_dir / "srun.args").exists()


# ---------------------------------------------------------------------------- exits and preemption
def test_normal_exit_does_not_requeue(fake, tmp_path):
    env, fake_dir = fake
    env.update(FAKE_EXIT="0")
    code, log = _run(env, tmp_path=tmp_path)
    assert code == 0 and "training finished" in log
    assert _requeues(fake_dir) == []


def test_crash_propagates_and_does_not_requeue(fake, tmp_path):
    env, fake_dir = fake
    env.update(FAKE_EXIT="3")
    code, log = _run(env, tmp_path=tmp_path)
    assert code == 3 and "training failed with exit status 3" in log
    assert _requeues(fake_dir) == []


def test_crash_requeues_only_when_asked_and_under_the_limit(fake, tmp_path):
    env, fake_dir = fake
    env.update(FAKE_EXIT="3", REQUEUE_ON_FAILURE="1", SLURM_RESTART_COUNT="2")
    code, _ = _run(env, tmp_path=tmp_path)
    assert code == 3 and _requeues(fake_dir) == [f"requeue {JOB_ID} saved=no"]
    (fake_dir / "scontrol.calls").unlink()
    env.update(SLURM_RESTART_COUNT="3")  # FAILURE_REQUEUE_LIMIT defaults to 3
    code, _ = _run(env, tmp_path=tmp_path)
    assert code == 3 and _requeues(fake_dir) == []


def _preempt(env, fake_dir, tmp_path, sig=signal.SIGUSR1, timeout=20):
    log = tmp_path / "job.log"
    proc = _start(env, log=log)
    try:
        _wait_for(lambda: (fake_dir / "worker.ready").exists(), 15, "the fake worker")
        sent = time.time()
        os.kill(proc.pid, sig)
        code = proc.wait(timeout=timeout)
        elapsed = time.time() - sent
    finally:
        _kill_group(proc)
    return code, log.read_text(), elapsed


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_sigusr1_saves_then_requeues(fake, tmp_path, launcher):
    env, fake_dir = fake
    env.update(LAUNCHER=launcher)
    code, log, _ = _preempt(env, fake_dir, tmp_path)
    assert code == 0, log
    assert "usr1_ignored_at_start=True" in (fake_dir / "worker.info").read_text()  # launcher shielded
    assert (fake_dir / "worker.saved").read_text() == "SIGUSR1"  # the worker got the signal it handles
    assert (fake_dir / "srun.signals").read_text().split() == ["USR1"]  # forwarded to srun
    assert _requeues(fake_dir) == [f"requeue {JOB_ID} saved=yes"]  # after the worker exited


def test_sigusr1_reaches_a_worker_that_was_still_starting(fake, tmp_path):
    env, fake_dir = fake
    env.update(FAKE_WORKER="late")  # ignores SIGUSR1 for its first 1.5 s; relay re-sends every 1 s
    code, log, elapsed = _preempt(env, fake_dir, tmp_path)
    assert code == 0, log
    assert (fake_dir / "worker.saved").read_text() == "SIGUSR1"
    assert _requeues(fake_dir) == [f"requeue {JOB_ID} saved=yes"]
    assert elapsed > 1.5


def test_sigusr1_requeues_after_timeout_when_training_does_not_stop(fake, tmp_path):
    env, fake_dir = fake
    env.update(FAKE_WORKER="stubborn", PREEMPT_TIMEOUT_S="2")
    code, log, elapsed = _preempt(env, fake_dir, tmp_path)
    assert code == 0, log
    assert "training still running 2 s after SIGUSR1" in log
    assert not (fake_dir / "worker.saved").exists()
    assert _requeues(fake_dir) == [f"requeue {JOB_ID} saved=no"]
    assert 2 <= elapsed < 6


def test_sigterm_never_requeues_even_when_training_does_not_stop(fake, tmp_path):
    env, fake_dir = fake
    env.update(FAKE_WORKER="stubborn", FAKE_WORKER_WAIT_S="3", PREEMPT_TIMEOUT_S="1")
    code, log, elapsed = _preempt(env, fake_dir, tmp_path, sig=signal.SIGTERM)
    assert code == 5, log  # the worker's own exit status once it gave up waiting, not the deadline's
    assert _requeues(fake_dir) == [] and "not requeueing" in log


def test_sigterm_saves_but_does_not_requeue(fake, tmp_path):
    env, fake_dir = fake
    code, log, _ = _preempt(env, fake_dir, tmp_path, sig=signal.SIGTERM)
    assert code == 0, log
    assert (fake_dir / "worker.saved").read_text() == "SIGUSR1"
    assert "not requeueing" in log
    assert _requeues(fake_dir) == []


# ------------------------------------------------------------------------------------- end to end
E2E_ARGS = [
    "train.max_steps=40", "train.save_every=1000", "train.log_every=1", "train.micro_batch_size=512",
    "train.progress_bar=false", "train.tensorboard=false", "model.teacher.iterations=50",
    "model.teacher.batch_size=64", "eval.samples_per_class=200", "eval.num_projections=32",
]


def test_real_trainer_preempted_requeued_and_resumed(fake, tmp_path):
    """Fake SLURM, real everything else: srun -> node_run.sh -> torchrun -> launch/train.py (gloo, CPU)."""
    from megadistill.engine.engines import free_port

    env, fake_dir = fake
    out = tmp_path / "run"
    bin_dir = Path(env["PATH"].split(os.pathsep)[0])
    (bin_dir / "torchrun").unlink()  # the real one
    env.update(FAKE_HOSTS="localhost", GPUS_PER_NODE="1", DS_CONFIG="configs/zero2.json",
               CONFIG="configs/toylab_dmd.yaml", MASTER_PORT=str(free_port()), PYTHONPATH=str(ROOT))
    args = [f"run.output_dir={out}", *E2E_ARGS]
    ckpts = out / "checkpoints"

    log = tmp_path / "first.log"
    proc = _start(env, *args, log=log)
    try:
        _wait_for(lambda: "step 2/40" in log.read_text(), 90, "training to start")
        os.kill(proc.pid, signal.SIGUSR1)
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        _kill_group(proc)
    first = log.read_text()
    saved = sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_"))
    assert len(saved) == 1, (saved, first[-3000:])
    step = int(saved[0].split("_")[1])
    assert 2 <= step < 40, first[-3000:]
    assert (ckpts / saved[0] / "COMPLETE").exists()
    assert "received signal 10" in first and f"preempted after step {step}" in first  # the trainer's handler
    assert _requeues(fake_dir) == [f"requeue {JOB_ID} saved=no"]
    assert not (out / "result.json").exists()  # a preempted run saves and stops: no evaluation

    (fake_dir / "scontrol.calls").unlink()
    env.update(SLURM_RESTART_COUNT="1", MASTER_PORT=str(free_port()))
    code, second = _run(env, *args, tmp_path=tmp_path, timeout=90)
    assert code == 0, second[-3000:]
    assert f"resumed from {ckpts / saved[0]} at step {step}" in second
    assert f"step {step}/40 " not in second and f"step {step + 1}/40 " in second
    assert json.loads((out / "result.json").read_text())["step"] == 40
    assert _requeues(fake_dir) == []
