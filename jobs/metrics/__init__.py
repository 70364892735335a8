"""The metrics as pure maths, no Ray and no I/O: `wer` (WER and CER after the Whisper English `normalizer`),
`captions` (CIDEr-D, BLEU, ROUGE-L through pycocoevalcap's Python scorers, SPIDEr; the Java behind the
tokenizer, METEOR and SPICE is jobs.scoring.coco_tools), `speed` (items/s, x real time, latency
percentiles). jobs.scoring runs them over stored predictions."""
