"""Streaming data: shard lists and the resumable loader, per-sample transforms, batch mixing."""
