"""The scorer's stages, distributed with Ray Data or run in-process on a small input, with the same code.
With `--references`, stage 1 first replaces the rows' references by a per-block join (`references`).

1. items (`items.item_table`): per block of prediction rows, each item's scoring fields: group keys,
   word and character edit counts (ASR), PTB-tokenized captions (captioning), speed fields;
2. totals (`totals.Totals`): a mergeable accumulator of sums, counts, exact value distributions,
   job spans and CIDEr-D document frequencies, per (corpus, task, model) and worker; one per block,
   merged by a Ray Data aggregate, summarised where it is merged;
3. captions (`captions.CaptionTotals`): per block, each item's CIDEr-D (with the corpus's document
   frequencies), METEOR statistics and SPICE; summed, then the corpus METEOR;
4. `pipeline.score_predictions` runs them and returns the groups jobs.score writes.
"""
