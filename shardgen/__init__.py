"""shardgen: pack CIFAR-10 (real, a user's copy, or synthetic) into WebDataset shards on any storage."""

from shardgen.pack import DEFAULT_SHARD_SIZE, ShardgenConfig, build

__all__ = ["DEFAULT_SHARD_SIZE", "ShardgenConfig", "build"]
