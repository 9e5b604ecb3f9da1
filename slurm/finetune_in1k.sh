#!/bin/bash
# Fine-tune a pretrained EfficientNetV2 on ImageNet-1k (accelerate), with auto-resume and requeue.
#   MODEL=xl sbatch slurm/finetune_in1k.sh init=runs/pretrain_xl/export [key=value ...]
# Env: MODEL (s|m|l|xl, default xl), CONFIG (default configs/finetune/in1k_$MODEL.yaml),
#      RUN_DIR (runs/finetune_in1k_$MODEL), LAUNCHER (srun | accelerate), PYTHON, SRUN_ARGS.
# The #SBATCH lines are defaults; sbatch options on the command line override them. See slurm/README.md.
#SBATCH --job-name=effnetv2-finetune-in1k
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

MODEL=${MODEL:-xl}
CONFIG=${CONFIG:-configs/finetune/in1k_${MODEL}.yaml}
ENTRY=${ENTRY:-pipeline.finetune}
RUN_DIR=${RUN_DIR:-runs/finetune_in1k_${MODEL}}
source "${REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/_launch.sh" "train.run_dir=$RUN_DIR" "$@"
