"""The scorer's stages, distributed with Ray Data or run in-process on a small input, with the same code.
With `--references`, stage 1 first replaces the rows' references by a per-block join (`references`).

1. items (`items.item_table`): per block of prediction rows, each item's scoring fields: group keys,
   word and character edit counts, normalized texts and word edits (ASR), PTB-tokenized captions
   (captioning: pycocoevalcap's Java tools, `coco_tools`), speed fields; the items no caption metric
   scores go to items.parquet (`item_scores`);
2. totals (`totals.Totals`): a mergeable accumulator of sums, counts, exact value distributions and
   job spans, per (corpus, task, model) and worker, and each group's error analysis (`analysis`: worst
   items, word edits, WER by duration, error examples); one per block, merged by a Ray Data aggregate,
   summarised where it is merged;
3. frequencies (`frequencies.frequency_parts`, `merge_parts`): CIDEr-D's document frequencies of each
   captioning group, counted per block and merged per n-gram hash range by a Ray Data groupby; they
   stay in the object store;
4. caption totals (`caption_totals.CaptionTotals`): per block, each item's CIDEr-D (with the group's
   document frequencies), METEOR statistics and score, SPICE, ROUGE-L and BLEU's n-gram statistics, and the
   block's items with their scores to items.parquet; summed, then the corpus METEOR and BLEU;
5. `pipeline.score_predictions` runs them and returns the groups.

`score.score` is the public API (jobs.score, jobs.infer and jobs.rescore call it): it runs the stages and
writes metrics.parquet, items.parquet, metrics.json and the report (`report`: Markdown and charts, with each
group's error analysis from `analysis`). The maths itself (WER, the caption metrics, speed figures) is jobs.metrics.
"""
