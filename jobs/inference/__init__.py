"""The inference job's stages, one module each; `jobs.infer` puts them together.

    read (a Ray Data read task per input shard, decoding as it reads) -> predict (the model's actor pool, or the
    dry run's rows) -> write (rows staged per shard, each shard's Parquet file committed once complete)

`plan` is the driver's read plan (the pending input shards, cut into read tasks); `decode` turns one item's
bytes into its waveform, its pieces and their model features; `dataset` builds the Ray Data pipeline and sizes
its resources; `settings` is what every stage is told.
"""
