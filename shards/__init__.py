"""WebDataset shard toolkit: write shards from dataset layouts, verify them, generate the demo data."""

__version__ = "1.0.0"


class ShardError(Exception):
    """A user or data error: the CLI prints its message on one line and exits with status 2."""
