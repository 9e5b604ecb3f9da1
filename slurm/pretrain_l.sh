#!/bin/bash
# EfficientNetV2-L pretraining on ImageNet-21k: DeepSpeed ZeRO, progressive stages, auto-resume, requeue.
#   sbatch slurm/pretrain_l.sh [key=value ...]          (from the repository root)
#   sbatch --nodes=2 slurm/pretrain_l.sh data.train=[/data/shards/in21k] train.micro_batch_size=64
# Env: CONFIG (default configs/pretrain/l_in21k.yaml), RUN_DIR (runs/pretrain_l), PYTHON, SRUN_ARGS.
# The #SBATCH lines are defaults; sbatch options on the command line override them. See slurm/README.md.
#SBATCH --job-name=effnetv2-l-in21k
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

CONFIG=${CONFIG:-configs/pretrain/l_in21k.yaml}
ENTRY=${ENTRY:-pipeline.pretrain}
RUN_DIR=${RUN_DIR:-runs/pretrain_l}
source "${REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/_launch.sh" "train.run_dir=$RUN_DIR" "$@"
