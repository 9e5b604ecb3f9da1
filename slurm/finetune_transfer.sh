#!/bin/bash
# Fine-tune a pretrained EfficientNetV2 on a transfer set (CIFAR-10/100, Flowers-102, Cars) with accelerate.
#   DATASET=cifar10 sbatch slurm/finetune_transfer.sh init=runs/pretrain_s/export [key=value ...]
# Env: DATASET (cifar10 | cifar100 | flowers102 | cars, default cifar10), CONFIG (default
#      configs/finetune/$DATASET.yaml), RUN_DIR (runs/finetune_$DATASET), LAUNCHER (srun | accelerate),
#      PYTHON, SRUN_ARGS.
# The #SBATCH lines are defaults; sbatch options on the command line override them. See slurm/README.md.
#SBATCH --job-name=effnetv2-finetune-transfer
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=10
#SBATCH --mem=0
#SBATCH --time=12:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

DATASET=${DATASET:-cifar10}
CONFIG=${CONFIG:-configs/finetune/${DATASET}.yaml}
ENTRY=${ENTRY:-pipeline.finetune}
RUN_DIR=${RUN_DIR:-runs/finetune_${DATASET}}
source "${REPO:-${SLURM_SUBMIT_DIR:-.}}/slurm/_launch.sh" "train.run_dir=$RUN_DIR" "$@"
