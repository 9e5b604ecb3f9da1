# Sourced by slurm/*.sh (not submitted itself): starts the training processes of a batch job and keeps the
# batch shell waiting while they save on a signal. Reads:
#   ENTRY     python module to run (pipeline.pretrain / pipeline.finetune)
#   CONFIG    run config passed as --config
#   PYTHON    interpreter (default: REPO/.venv/bin/python if present, else python3)
#   REPO      repository root (default: the folder sbatch was called from, SLURM_SUBMIT_DIR)
#   LAUNCHER  srun (default: one task per GPU, python started directly) or accelerate (one
#             `accelerate launch` per node; fine-tuning only; see slurm/README.md for its signal caveat)
#   SRUN_ARGS extra srun options;  MASTER_ADDR / MASTER_PORT override the rendezvous
# and passes the script's own arguments (key=value overrides) to the python module.

set -euo pipefail

if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "error: submit this script with sbatch (e.g. sbatch $0), it needs a SLURM allocation" >&2
  exit 2
fi

REPO=${REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
if [ ! -f "$CONFIG" ]; then
  echo "error: CONFIG=$CONFIG does not exist (relative to $REPO); set CONFIG=configs/... or submit from the repo root" >&2
  exit 2
fi

# Rendezvous: the first node of the allocation; the port from the job id, so every task (and the requeued
# job, which keeps its id) computes the same one. Same rule as pipeline.distributed.slurm_port.
export MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
export MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export PYTHONUNBUFFERED=1
LAUNCHER=${LAUNCHER:-srun}

echo "[$(date -u +%FT%TZ)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): ${SLURM_JOB_NUM_NODES:-1} node(s)," \
     "${SLURM_NTASKS:-1} task(s), launcher $LAUNCHER, rendezvous $MASTER_ADDR:$MASTER_PORT"
echo "  $PYTHON -m $ENTRY --config $CONFIG $*"

case "$LAUNCHER" in
  srun)
    # One task per GPU and no launcher process in between: `exec` replaces the shell by python, so the
    # signals SLURM sends to the tasks (USR1 before the time limit, TERM on scancel / preemption) reach the
    # training processes themselves. torchrun / accelerate launch would die on USR1 (no handler) and give
    # their workers only 30 s after TERM. RANK / WORLD_SIZE / LOCAL_RANK are exported for DeepSpeed and
    # accelerate; pipeline.distributed reads the same values from SLURM_PROCID etc.
    # shellcheck disable=SC2016  # expanded per task, by the task's own shell
    srun --kill-on-bad-exit=1 ${SRUN_ARGS:-} bash -c '
      export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_STEP_NUM_TASKS LOCAL_RANK=$SLURM_LOCALID
      export LOCAL_WORLD_SIZE=${SLURM_STEP_TASKS_PER_NODE%%[(,]*}
      exec "$@"' launch "$PYTHON" -m "$ENTRY" --config "$CONFIG" "$@" &
    ;;
  accelerate)
    # One launcher per node, spawning one process per GPU. It forwards USR1 to its workers only because
    # TORCHELASTIC_SIGNALS_TO_HANDLE lists it, and kills them 30 s after a signal: fine for short
    # fine-tuning checkpoints, not for ZeRO pretraining (use LAUNCHER=srun there).
    export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
    PROCS_PER_NODE=${PROCS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_NTASKS_PER_NODE:-1}}}
    export PROCS_PER_NODE
    # shellcheck disable=SC2016
    srun --kill-on-bad-exit=1 --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
      ${SRUN_ARGS:-} bash -c '
      exec "$1" -m accelerate.commands.launch --multi_gpu --num_machines "$SLURM_JOB_NUM_NODES" \
        --machine_rank "$SLURM_NODEID" --num_processes $((SLURM_JOB_NUM_NODES * PROCS_PER_NODE)) \
        --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" -m "${@:2}"' \
      launch "$PYTHON" "$ENTRY" --config "$CONFIG" "$@" &
    ;;
  *)
    echo "error: LAUNCHER=$LAUNCHER is not srun or accelerate" >&2
    exit 2
    ;;
esac
SRUN_PID=$!

# The batch shell gets TERM too (scancel, preemption, `scontrol requeue`): note it and keep waiting, so the
# job does not end while the training processes are still writing their checkpoint.
trap 'echo "[$(date -u +%FT%TZ)] batch script: SIGTERM; waiting for the training processes to save and exit"' TERM
trap 'echo "[$(date -u +%FT%TZ)] batch script: SIGUSR1 (the tasks got it too unless --signal=B:...)"' USR1
while :; do
  rc=0
  wait "$SRUN_PID" || rc=$?
  # wait returns >128 when a trapped signal interrupts it; go on waiting while srun is still running.
  if [ "$rc" -le 128 ] || ! kill -0 "$SRUN_PID" 2>/dev/null; then break; fi
done
echo "[$(date -u +%FT%TZ)] job $SLURM_JOB_ID: training processes exited with $rc"
exit "$rc"
