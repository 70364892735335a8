"""The inference job's stages, one module each; `jobs.infer` puts them together.

    work items (driver) -> decode (CPU tasks) -> predict (the model's actor pool) -> collect (Parquet per shard)

`dataset` builds the Ray Data pipeline and sizes its resources; `settings` is what every stage is told.
"""
