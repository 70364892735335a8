"""The metrics as pure maths, no Ray and no I/O: `wer` (WER and CER after the Whisper English `normalizer`),
`captions` (CIDEr-D, METEOR, SPICE, SPIDEr through pycocoevalcap), `speed` (items/s, x real time, latency
percentiles). jobs.scoring runs them over stored predictions."""
