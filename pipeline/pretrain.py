"""Entry point: ``python -m pipeline.pretrain --config configs/pretrain/xl_in21k.yaml [key=value ...]``.

Started by torchrun, the deepspeed launcher or srun (pipeline.distributed reads whichever set the rank).
"""

from pipeline.distributed import exit_process
from pipeline.trainer import main

if __name__ == "__main__":
    exit_process(main())
