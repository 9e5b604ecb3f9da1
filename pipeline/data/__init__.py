"""Streaming data: shard lists and the resumable loader, per-sample transforms, batch mixing.

The package imports nothing itself: ``pipeline.data.shards`` (read by the ``python -m pipeline.progressive``
preview) does not pull in the loader and its transforms (torchvision). Import from the modules:
``pipeline.data.loader`` (build_train_loader, build_eval_loader), ``pipeline.data.shards`` (DataError), ...
"""
