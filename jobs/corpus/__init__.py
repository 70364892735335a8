"""Corpora: manifests in, work items and audio bytes out; no Ray.

`manifest_schema` (Manifest, load_manifest) and the parts it is made of: `urls` (expansion, resolution, globs),
`items` (the work-item schema and checks, item-list shards), `tars` (WebDataset shards streamed), `walk` (an
input shard to its checked work items and their audio: the one way every reader goes through a corpus),
`fetch` (one item's audio bytes, with retries), `errors`; `make` makes corpora (tar shards, seed import),
`texts`, `voices` and `synthetic_speech` the synthetic speech corpus.
"""
