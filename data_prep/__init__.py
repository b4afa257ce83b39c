"""data_prep: turn image-text sources into WebDataset shards (`baton shards SOURCE ...`).

Every source plans a sequence of inputs (`data_prep.items.Item`, ready `data_prep.writer.Sample`s
or `Skip`s); the shard job (`data_prep.job.run_job`: chunks of inputs -> shards, worker
processes, job-array parts, resume) processes them (`data_prep.items.process_item`: fetch,
decode, check, resize, re-encode) and the one shared writer (`data_prep.writer`) writes the tars
and `stats.json`, so the on-disk contract in docs/architecture.md lives in a single place.
"""
