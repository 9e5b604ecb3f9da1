"""EfficientNetV2 training pipeline."""
