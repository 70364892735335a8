"""Long recordings: cut at pauses (Silero VAD) or into fixed windows, every item's pieces batched together,
answers stitched in order, and the job's `segments` column (`--long-form segment|truncate`); Whisper's language
and word times over the pieces."""

import json
from dataclasses import asdict
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from jobs.infer import parse_args, run
from jobs.inference.decode import decode_item
from jobs.metrics.wer import corpus_wer
from jobs.samples import default_dest, fetch_librivox
from jobs.scoring.pipeline import score_predictions
from nota_model import load_audio, load_config, load_model, segment
from nota_model.audio import SAMPLE_RATE, AudioClip, prepare_waveform
from nota_model.config import AudioConfig, DecodingConfig, SignalsConfig
from nota_model.decoding import GenerationOutput
from nota_model.errors import AudioError
from nota_model.long_form import generate_pieces
from nota_model.packs import build
from nota_model.segment import plan_pieces, speech_spans
from nota_model.transcribe import Item, run_batch

WINDOW = 30 * SAMPLE_RATE
TINY_DECODING = DecodingConfig(num_beams=1, max_new_tokens=6)


@pytest.fixture(scope="module")
def librivox() -> list[dict]:
    return [json.loads(line) for line in fetch_librivox(default_dest()).read_text().splitlines()]


@pytest.fixture(scope="module")
def speech(librivox) -> np.ndarray:
    """About 55 s of real read speech: the five LibriVox clips twice, half a second of silence between clips."""
    pause = np.zeros(SAMPLE_RATE // 2, dtype=np.float32)
    clips = [sf.read(item["audio"], dtype="float32")[0] for item in librivox]
    return np.concatenate([part for clip in clips * 2 for part in (clip, pause)])


def clip_of(waveform: np.ndarray) -> AudioClip:
    return prepare_waveform(waveform, SAMPLE_RATE, AudioConfig(), truncate=False)


def test_speech_is_cut_at_pauses_into_pieces_that_fit_the_window_and_cover_all_speech(speech):
    pieces = plan_pieces(speech, "asr", 30).pieces
    assert len(pieces) == 2 and all(0 < end - start <= WINDOW for start, end in pieces)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(pieces, pieces[1:]))
    spans = speech_spans(speech, 30)
    assert len(spans) > len(pieces)  # neighbouring speech was merged up to the window
    assert all(any(start <= s and e <= end for start, end in pieces) for s, e in spans)
    cut = (pieces[0][1] + pieces[1][0]) / 2
    assert np.abs(speech[round(cut) - 800 : round(cut) + 800]).max() == 0  # the cut falls in an inserted pause


def test_the_vad_hears_the_spans_that_silero_s_own_loop_hears(speech):
    """`speech_spans` asks Silero's ONNX session directly; the package's own `get_speech_timestamps` (its wrapper,
    window by window) is the reference: the same spans on real speech, noise, a short clip and an empty one."""
    import silero_vad
    import torch

    wrapped = silero_vad.load_silero_vad(onnx=True)
    noise = np.random.default_rng(0).normal(0, 0.1, 3 * SAMPLE_RATE).astype(np.float32)
    for waveform in (speech, noise, speech[: SAMPLE_RATE // 10], speech[:0]):
        for max_seconds, pad_ms in ((30, segment.SPEECH_PAD_MS), (5, 30)):
            reference = silero_vad.get_speech_timestamps(
                torch.from_numpy(waveform), wrapped, sampling_rate=SAMPLE_RATE,
                max_speech_duration_s=max_seconds, min_silence_duration_ms=segment.MIN_SILENCE_MS, speech_pad_ms=pad_ms)
            assert speech_spans(waveform, max_seconds, pad_ms) == [(span["start"], span["end"]) for span in reference]
    assert len(speech_spans(speech, 5)) > len(speech_spans(speech, 30))  # the case above that splits long speech


def test_silence_gives_no_piece_and_other_tasks_fixed_windows():
    silence = np.zeros(60 * SAMPLE_RATE, dtype=np.float32)
    assert plan_pieces(silence, "asr", 30) == segment.PiecePlan([], speech_share=0.0)
    assert plan_pieces(silence, "asr", 30, skip_silence=False).pieces == []  # a long recording's silence never runs
    windows = plan_pieces(np.zeros(70 * SAMPLE_RATE, dtype=np.float32), "aac", 30)
    assert windows == segment.PiecePlan([(0, WINDOW), (WINDOW, 2 * WINDOW), (2 * WINDOW, 70 * SAMPLE_RATE)], speech_share=None)


def test_a_clip_that_fits_the_window_is_one_whole_piece_where_the_vad_hears_speech(speech):
    heard = plan_pieces(speech[:WINDOW], "asr", 30)
    assert heard.pieces == [(0, WINDOW)] and 0.8 < heard.speech_share <= 1.0
    assert plan_pieces(np.zeros(SAMPLE_RATE, dtype=np.float32), "asr", 30) == segment.PiecePlan([], speech_share=0.0)
    assert plan_pieces(np.zeros(SAMPLE_RATE, dtype=np.float32), "asr", 30, skip_silence=False).pieces == [(0, SAMPLE_RATE)]


def test_other_tasks_never_see_the_vad(speech, monkeypatch):
    monkeypatch.setattr(segment, "speech_spans", lambda *_: pytest.fail("the VAD ran for captioning"))
    assert plan_pieces(speech[:WINDOW], "aac", 30) == segment.PiecePlan([(0, WINDOW)], speech_share=None)


class RecordingModel:
    """Answers each piece with its length in samples, and records the batches it was given."""

    config = SimpleNamespace(audio=AudioConfig(min_seconds=1.0), decoding=DecodingConfig(), signals=SignalsConfig())

    def __init__(self):
        self.batches: list[list[int]] = []

    def prompt_for(self, task: str, prompt: str | None = None) -> str:
        return prompt or task

    def generate(self, clips, prompts, decoding=None, features=None) -> GenerationOutput:
        lengths = [len(clip.waveform) for clip in clips]
        self.batches.append(lengths)
        texts = [f" {prompt}{length} " for prompt, length in zip(prompts, lengths)]
        return GenerationOutput(texts, [[1]] * len(clips), [2] * len(clips), ttft_s=1.0, tpot_s=0.5, decode_steps=2)


def test_pieces_of_all_items_fill_the_batches_longest_first_and_come_back_in_order():
    s = SAMPLE_RATE
    clips = [clip_of(np.ones(n * s, dtype=np.float32)) for n in (100, 20, 60, 50)]
    pieces = [[(0, 25 * s), (30 * s, 50 * s), (60 * s, 90 * s)], [(0, 20 * s)], [], [(0, 2 * s), (40 * s, 50 * s)]]
    model = RecordingModel()
    output = generate_pieces(model, clips, ["a", "b", "c", "d"], pieces, batch_size=3)
    assert model.batches == [[30 * s, 25 * s, 20 * s], [20 * s, 10 * s, 2 * s]]  # across items, longest first
    long, short, silent, two = output.answers
    assert long.text == f"a{25 * s} a{20 * s} a{30 * s}" and [(g.start, g.end) for g in long.segments] == [(0, 25), (30, 50), (60, 90)]
    assert short.text == f" b{20 * s} "  # a whole clip's answer is the model's, untouched
    assert (silent.text, silent.segments, silent.output_tokens, silent.batch_size) == ("", [], 0, None)
    assert two.text == f"d{2 * s} d{10 * s}" and two.output_tokens == 4 and two.batch_size == 3
    assert (output.ttft_s, output.tpot_s, output.model_batches) == (1.0, 0.5, 2)


def test_a_piece_shorter_than_the_minimum_is_padded_like_a_short_recording():
    model = RecordingModel()
    generate_pieces(model, [clip_of(np.ones(40 * SAMPLE_RATE, dtype=np.float32))], ["a"], [[(0, 4000), (4000, 40 * SAMPLE_RATE)]], 8)
    assert model.batches == [[40 * SAMPLE_RATE - 4000, SAMPLE_RATE]]


def test_a_batch_of_long_and_short_items_gives_what_each_gives_alone(tiny, speech, librivox):
    model = tiny.model
    short = load_audio(librivox[0]["audio"], model.config.audio)
    clips = [clip_of(speech), short, clip_of(np.random.default_rng(0).normal(0, 0.1, 40 * SAMPLE_RATE).astype(np.float32))]
    tasks = ["asr", "asr", "aac"]
    prompts = [model.prompt_for(task) for task in tasks]
    pieces = [plan_pieces(clip.waveform, task, 30).pieces for clip, task in zip(clips, tasks)]
    assert [len(p) for p in pieces] == [2, 1, 2]
    together = generate_pieces(model, clips, prompts, pieces, batch_size=4, decoding=TINY_DECODING).answers
    alone = [generate_pieces(model, [c], [p], [ps], batch_size=1, decoding=TINY_DECODING).answers[0]
             for c, p, ps in zip(clips, prompts, pieces)]
    assert [(a.text, a.segments, a.output_tokens) for a in together] == [(a.text, a.segments, a.output_tokens) for a in alone]
    assert together[1].text == model.generate([short], [prompts[1]], TINY_DECODING).texts[0]


def test_recordings_over_the_limit_are_refused_before_decoding(speech, tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, speech, SAMPLE_RATE)
    config = AudioConfig(max_recording_seconds=20)
    with pytest.raises(AudioError) as refused:
        load_audio(path, config, whole=True)
    assert refused.value.code == "audio_too_long"
    assert load_audio(path, config).truncated  # truncating has no limit: it keeps 30 s
    assert load_audio(path, AudioConfig(), whole=True).seconds == pytest.approx(len(speech) / SAMPLE_RATE)


def test_the_single_process_runner_segments_too(speech, tmp_path):
    sf.write(tmp_path / "long.wav", speech, SAMPLE_RATE)
    sf.write(tmp_path / "short.wav", speech[: 5 * SAMPLE_RATE], SAMPLE_RATE)
    items = [Item("long", str(tmp_path / "long.wav"), "asr"), Item("short", str(tmp_path / "short.wav"), "asr"),
             Item("missing", str(tmp_path / "missing.wav"), "asr")]
    rows = run_batch(RecordingModel(), items, "recording")
    assert [len(row.get("segments") or []) for row in rows] == [2, 1, 0] and rows[2]["error"] == "missing_audio"
    assert rows[1]["text"] == f" asr{5 * SAMPLE_RATE} " and not rows[0]["truncated"]


@pytest.mark.real_weights
def test_whisper_long_form_transcribes_as_well_as_the_clips_one_by_one(speech, librivox):
    build("whisper-tiny.en")
    model = load_model(load_config("whisper-tiny.en"), device="cpu").model
    references = [item["reference"] for item in librivox] * 2
    clips = [load_audio(item["audio"], model.config.audio) for item in librivox]
    short = corpus_wer(references, model.generate(clips).texts * 2).wer
    prompt = model.prompt_for("asr")
    long = generate_pieces(model, [clip_of(speech)], [prompt], [plan_pieces(speech, "asr", 30).pieces], batch_size=8).answers[0]
    assert len(long.segments) == 2
    assert corpus_wer([" ".join(references)], [long.text]).wer <= short + 0.02, (long.text, short)


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory, speech) -> tuple:
    root = tmp_path_factory.mktemp("long")
    sf.write(root / "speech.wav", speech, SAMPLE_RATE)
    sf.write(root / "silence.wav", np.zeros(45 * SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    sf.write(root / "short.wav", speech[: 5 * SAMPLE_RATE], SAMPLE_RATE)
    sf.write(root / "quiet.wav", np.zeros(3 * SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    sf.write(root / "noise.wav", np.random.default_rng(0).normal(0, 0.1, 3 * SAMPLE_RATE).astype(np.float32), SAMPLE_RATE)
    items = [("speech", "speech.wav", "asr"), ("silence", "silence.wav", "asr"), ("short", "short.wav", "asr"), ("sounds", "speech.wav", "aac"),
             ("quiet", "quiet.wav", "asr"), ("noise", "noise.wav", "asr")]
    (root / "items.jsonl").write_text("".join(json.dumps({"id": i, "audio": str(root / a), "task": t}) + "\n" for i, a, t in items))
    (root / "corpus.yaml").write_text("name: long\ntask: asr\nitems: items.jsonl\n")
    return root / "corpus.yaml", len(speech) / SAMPLE_RATE


def long_job(manifest, output, *extra: str) -> dict:
    sets = ["--set", "decoding.num_beams=1", "--set", "decoding.max_new_tokens=4"]
    run(parse_args(["--manifest", str(manifest), "--model", "tiny", "--output", str(output), "--batch-size", "4", "--no-score", *sets, *extra]))
    return {row["id"]: row for row in pq.read_table(output / "long").to_pylist()}


def test_the_job_segments_long_recordings_into_one_row_each_and_keeps_audio_without_speech_from_the_model(
        local_ray, long_corpus, tmp_path):
    manifest, seconds = long_corpus
    rows = long_job(manifest, tmp_path / "out")
    assert sorted(rows) == ["noise", "quiet", "short", "silence", "sounds", "speech"] and all(row["error"] is None for row in rows.values())
    speech, silence, short, sounds = (rows[i] for i in ("speech", "silence", "short", "sounds"))
    assert len(speech["segments"]) == 2 and speech["segments"][-1]["end"] <= seconds and not speech["truncated"]
    assert speech["text"] == " ".join(s["text"].strip() for s in speech["segments"] if s["text"].strip())
    assert [(s["start"], s["end"]) for s in sounds["segments"]] == [(0.0, 30.0), (30.0, pytest.approx(seconds))]
    assert (silence["text"], silence["segments"], silence["ttft_s"]) == ("", [], None)
    assert short["segments"] == [{"start": 0.0, "end": 5.0, "text": short["text"]}]
    for unheard in (rows["quiet"], rows["noise"], silence):  # no speech: an empty answer, no model call, the flag
        assert (unheard["text"], unheard["segments"], unheard["ttft_s"], unheard["speech_share"], unheard["flags"]) == (
            "", [], None, 0.0, ["no_speech"])
    assert short["speech_share"] > 0.8 and short["mean_logprob"] < 0 and "no_speech" not in short["flags"]
    assert sounds["speech_share"] is None and "no_speech" not in sounds["flags"]  # captioning: the VAD never listens
    run = json.loads((tmp_path / "out/long/_RUN.json").read_text())
    assert run["long_form"] == "segment" and run["signals"]["skip_silence"]
    groups = {group["task"]: group for group in score_predictions(str(tmp_path / "out"), distributed=False).groups}
    assert (groups["asr"]["segmented_items"], groups["aac"]["segmented_items"]) == (2, 1)  # speech and silence; sounds
    assert groups["asr"]["flags"]["no_speech"] == 3 and groups["asr"]["signalled_items"] == 5


@pytest.mark.real_weights
def test_the_whisper_job_gives_each_row_the_language_and_word_times_the_model_gives_it_alone(local_ray, speech, librivox, tmp_path):
    build("whisper-tiny.en")
    sf.write(tmp_path / "long.wav", speech[: 40 * SAMPLE_RATE], SAMPLE_RATE)
    sf.write(tmp_path / "silence.wav", np.zeros(35 * SAMPLE_RATE, dtype=np.float32), SAMPLE_RATE)
    items = {"long": str(tmp_path / "long.wav"), "short": librivox[0]["audio"], "silence": str(tmp_path / "silence.wav")}
    (tmp_path / "items.jsonl").write_text("".join(json.dumps({"id": i, "audio": a, "task": "asr"}) + "\n" for i, a in items.items()))
    (tmp_path / "corpus.yaml").write_text("name: words\ntask: asr\nitems: items.jsonl\n")
    run(parse_args(["--manifest", str(tmp_path / "corpus.yaml"), "--model", "whisper-tiny.en", "--output", str(tmp_path / "out"),
                    "--batch-size", "2", "--no-score"]))
    rows = {row["id"]: row for row in pq.read_table(tmp_path / "out/words").to_pylist()}
    config = load_config("whisper-tiny.en")
    model = load_model(config, device="cpu").model
    for row in rows.values():
        clip = load_audio(row["audio"], config.audio, whole=True)
        alone = generate_pieces(model, [clip], [row["prompt"]], [plan_pieces(clip.waveform, "asr", 30).pieces], 1).answers[0]
        assert row["words"] == (None if alone.words is None else [asdict(word) for word in alone.words]), row["id"]
        assert (row["language"], row["language_probability"]) == (alone.language, alone.language_probability)
    long = rows["long"]
    words, pieces = long["words"], long["segments"]
    assert len(pieces) == 2 and (long["language"], long["language_probability"]) == ("en", None)  # English-only: no probability
    assert "".join(word["word"] for word in words) == "".join(piece["text"] for piece in pieces)
    assert all(0 <= a["start"] <= a["end"] <= b["start"] <= b["end"] <= 40 for a, b in zip(words, words[1:]))
    assert all(any(p["start"] <= w["start"] <= w["end"] <= p["end"] for p in pieces) for w in words)
    assert any(w["start"] >= pieces[1]["start"] for w in words)  # the second piece's words, in the recording's seconds
    assert (rows["silence"]["language"], rows["silence"]["words"]) == (None, None)  # no piece reached the model
    assert json.loads(json.loads((tmp_path / "out/words/_RUN.json").read_text())["decoding"])["word_timestamps"]


@pytest.mark.parametrize("mode", ["segment", "truncate"])
def test_decoding_plans_the_pieces_or_truncates_as_the_config_says(mode, speech, tmp_path):
    sf.write(tmp_path / "speech.wav", speech, SAMPLE_RATE)
    item = {"id": "speech", "audio": str(tmp_path / "speech.wav"), "task": "asr", "error": None}
    row = decode_item(item, (tmp_path / "speech.wav").read_bytes(), AudioConfig(long_form=mode))
    clip = json.loads(row["clip"])
    if mode == "segment":
        assert not clip["truncated"] and len(row["waveform"]) == 4 * len(speech) and len(row["pieces"]) == 2
    else:
        assert clip["truncated"] and len(row["waveform"]) == 4 * WINDOW and row["pieces"] == [(0, WINDOW)]
