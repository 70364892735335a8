"""Corpora: manifests in, work items and audio bytes out; no Ray.

`manifest` (Manifest, load_manifest) and the parts it is made of: `urls` (expansion, resolution, globs),
`items` (the work-item schema and checks, item-list shards), `tars` (WebDataset shards streamed),
`fetch` (one item's audio bytes, with retries), `errors`; `build` makes corpora (tar shards, seed import).
"""
