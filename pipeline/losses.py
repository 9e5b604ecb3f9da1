"""The training loss shared by pretraining and fine-tuning (torch only, no DeepSpeed or accelerate)."""

import torch


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum(targets * log_softmax(logits)), in float32.

    ``targets`` (B, K) are already soft: label smoothing, mixup / cutmix and normalised multi-label targets
    are applied by the loader (pipeline.data.mixing)."""
    return torch.sum(-targets.float() * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
