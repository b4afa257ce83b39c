"""Image-text batches streamed from WebDataset shards through fsspec (local, file://, http(s)://, s3://).

`sources` resolves `data.train_shards` (weighted sources) and plans epochs; `samples` turns shard
bytes into training samples (a tuple of tensors each: CLIP's image + tokens), skipping and counting corrupt samples; `loader` runs it in DataLoader
workers with a position that goes into the training checkpoint (exact resume).
"""

from pretrain.data.loader import EpochStream, TrainLoader, make_loader, run_steps_per_epoch, steps_per_epoch
from pretrain.data.samples import (IMAGE_KEYS, REASONS, Rejected, SampleMap, SampleToPair, decode_image,
                                   seeded_transform)
from pretrain.data.sources import ShardList, Sources, resolve_shards, resolve_sources

__all__ = ["EpochStream", "TrainLoader", "make_loader", "run_steps_per_epoch", "steps_per_epoch", "IMAGE_KEYS", "REASONS", "Rejected",
           "SampleMap", "SampleToPair", "decode_image", "seeded_transform", "ShardList", "Sources", "resolve_shards", "resolve_sources"]
