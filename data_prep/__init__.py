"""data_prep: turn image-text sources into WebDataset shards (`baton shards SOURCE ...`).

Every source is an iterator of records (`data_prep.writer.Sample` or `Skip`); the one shared
writer (`data_prep.writer.write_shards`) turns records into `shard-NNNNNN.tar` files plus
`stats.json`, so the on-disk contract in docs/architecture.md lives in a single place.
"""
