"""WebDataset shard toolkit."""
