"""The Ray Data job on a local Ray, tiny model: one row per item, error codes, batch == one by one, resume."""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from jobs import cli
from jobs.corpus.make import build_shards
from jobs.infer import parse_args, run
from jobs.inference.decode import decode_item
from jobs.predictions import OUTPUT_SCHEMA, OutputMismatchError, read_predictions
from nota_model import load_audio, load_config, load_model
from nota_model.config import DecodingConfig
from nota_model.features import ModelFeatures, compute_features
from nota_model.long_form import generate_pieces
from nota_model.segment import plan_pieces
from tests.s3 import moto_server, s3_filesystem

# Greedy and short; the test corpora's tones are no speech, which the VAD would keep from the model
TINY_SETTINGS = ["decoding.num_beams=1", "decoding.max_new_tokens=6", "signals.skip_silence=false"]


def tone(seconds: float, rate: int = 16000, channels: int = 1, freq: float = 300.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.3 * np.sin(2 * np.pi * freq * t * (1 + t / 4))).astype(np.float32)
    return np.stack([mono] * channels, axis=1) if channels > 1 else mono


def wav_bytes(samples: np.ndarray, rate: int, fmt: str = "WAV") -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, samples, rate, format=fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str | None]]:
    """A corpus of good and bad items; returns the manifest path and each id's expected error code."""
    root = tmp_path_factory.mktemp("corpus")
    files = {
        "good-1": ("a.wav", wav_bytes(tone(2.0), 16000), None),
        "good-stereo-44k": ("b.flac", wav_bytes(tone(3.0, 44100, 2, 500.0), 44100, "FLAC"), None),
        "good-long": ("c.wav", wav_bytes(tone(45.0, 8000, 1, 200.0), 8000), None),
        "good-short": ("d.ogg", wav_bytes(tone(0.3, 16000, 1, 700.0), 16000, "OGG"), None),
        "empty": ("e.wav", b"", "empty_audio"),
        "garbage": ("f.mp3", b"\x00\x13garbage" * 100, "not_audio"),
        "cut": ("g.wav", wav_bytes(tone(2.0), 16000)[:20000], "truncated_audio"),
        "missing": ("does-not-exist.wav", None, "missing_audio"),
    }
    lines = []
    for item_id, (name, data, _) in files.items():
        if data is not None:
            (root / name).write_bytes(data)
        lines.append(json.dumps({"id": item_id, "audio": str(root / name), "reference": "a tone"}))
    lines.append(json.dumps({"id": "captioned", "audio": str(root / "a.wav"), "task": "aac"}))
    (root / "items.jsonl").write_text("\n".join(lines) + "\n")
    manifest = root / "corpus.yaml"
    manifest.write_text("name: mixed\ntask: asr\nitems: items.jsonl\nitems_per_shard: 3\n")
    expected = {item_id: code for item_id, (_, _, code) in files.items()} | {"captioned": None}
    return manifest, expected


def job_args(manifest: Path, output: Path, *extra: str):
    sets = [arg for setting in TINY_SETTINGS for arg in ("--set", setting)]
    return parse_args(["--manifest", str(manifest), "--model", "tiny", "--output", str(output), "--batch-size", "3", *sets, *extra])


def read_rows(output: Path) -> list[dict]:
    files = sorted(output.glob("mixed/part-*.parquet"))
    return [row for file in files for row in pq.read_table(file).to_pylist()]


@pytest.fixture(scope="module")
def finished(local_ray, corpus, tmp_path_factory) -> tuple[dict, Path]:
    """The job run once over the corpus, scored: its summary and output, which the tests below check (a test that
    writes to the output takes a copy, `copy_of`)."""
    output = tmp_path_factory.mktemp("finished") / "out"
    return run(job_args(corpus[0], output)), output


def copy_of(output: Path, tmp_path: Path) -> Path:
    """A copy of the shared run's output in the test's own folder, for a test that runs the job on it again."""
    return Path(shutil.copytree(output, tmp_path / "out"))


def test_every_item_gets_exactly_one_row_with_the_right_error(corpus, finished):
    _, expected = corpus
    summary, output = finished
    rows = read_rows(output)
    assert sorted(row["id"] for row in rows) == sorted(expected)
    assert {row["id"]: row["error"] for row in rows} == expected
    assert pq.read_schema(next(output.glob("mixed/part-*.parquet"))).equals(OUTPUT_SCHEMA, check_metadata=False)
    assert summary["items"] == 9 and summary["errors"] == 4 and summary["shards_written"] == 3
    good = {row["id"]: row for row in rows if row["error"] is None}
    # 45 s of a tone, segmented: no speech, so no piece and no model call, and an empty answer
    assert (good["good-long"]["truncated"], good["good-long"]["segments"], good["good-long"]["text"]) == (False, [], "")
    assert good["good-long"]["audio_seconds"] == pytest.approx(45.0)
    assert good["good-stereo-44k"]["channels"] == 2 and good["good-stereo-44k"]["sample_rate"] == 44100
    assert good["captioned"]["prompt"].endswith("Please write down what your hear in the audio.")
    assert all(row["model"] == "tiny+no-checkpoint+float32" and row["job_id"] == summary["job_id"] for row in rows)
    assert all(row["output_tokens"] is not None and row["ttft_s"] > 0 for row in good.values() if row["segments"])
    assert json.loads((output / "mixed" / "_SUCCESS.json").read_text())["items"] == 9
    assert sorted(row["id"] for row in read_predictions(str(output)).to_pylist()) == sorted(expected)  # the folder reads as one table
    assert all(row["model_s"] > 0 and row["batch_size"] >= 1 for row in good.values() if row["segments"])
    assert all(row["actor_cpu_s"] >= 0 for row in good.values())  # the model actor's CPU outside generate, per item


def test_duckdb_reads_the_outputs_signals_language_and_words(finished, tmp_path):
    """The README's DuckDB queries over the trust columns: the job's own files, and a row that carries words."""
    import duckdb
    _, output = finished
    files = str(output / "*" / "part-*.parquet")
    counted = duckdb.sql(f"""SELECT count(*), count(mean_logprob), count(language), count(words), sum(len(flags))
                             FROM read_parquet('{files}')""").fetchall()[0]
    # 5 answered rows, one of them (45 s of a tone) never reached the model; tiny (a NOTA model) has no language, no words
    assert counted[:4] == (9, 4, 0, 0) and counted[4] >= 0
    row = {**read_rows(output)[0], "words": [{"word": " Hello", "start": 0.1, "end": 0.4, "probability": 0.3},
                                             {"word": " there.", "start": 0.5, "end": 0.9, "probability": 0.8}]}
    pq.write_table(pa.Table.from_pylist([row], schema=OUTPUT_SCHEMA), tmp_path / "part-00000.parquet")
    unsure = duckdb.sql(f"""SELECT id, w.word, w.start, w."end" FROM (SELECT id, unnest(words) AS w
                            FROM read_parquet('{tmp_path}/part-*.parquet')) WHERE w.probability < 0.5""").fetchall()
    assert unsure == [(row["id"], " Hello", 0.1, 0.4)]


def test_the_job_scores_its_corpus_at_the_end(local_ray, corpus, finished, tmp_path):
    summary, output = finished
    scores = json.loads((output / "mixed/_scores/metrics.json").read_text())
    assert scores["groups"] == summary["groups"]
    asr, aac = sorted(summary["groups"], key=lambda group: group["task"] != "asr")
    assert (asr["task"], asr["items"], asr["errors"], asr["scored_items"]) == ("asr", 8, 4, 4)
    assert asr["quality"]["wer"] > 0 and asr["speed"]["items"] == 4 and asr["speed"]["items_per_s"] > 0
    assert aac["task"] == "aac" and "pass --references" in aac["unavailable"]["quality"]  # the item has no caption
    assert (output / "mixed/_scores/report.md").exists()
    assert not run(job_args(corpus[0], tmp_path / "quiet", "--no-score")).get("groups")


def test_job_output_equals_the_model_one_item_at_a_time(finished):
    _, output = finished
    rows = {row["id"]: row for row in read_rows(output) if row["error"] is None}
    config = load_config("tiny", {"decoding": {"num_beams": 1, "max_new_tokens": 6}, "signals": {"skip_silence": False}})
    model = load_model(config, device="cpu").model
    for row in rows.values():
        clip = load_audio(row["audio"], config.audio, whole=True)
        pieces = plan_pieces(clip.waveform, row["task"], config.audio.max_seconds, config.signals.skip_silence).pieces
        alone = generate_pieces(model, [clip], [row["prompt"]], [pieces], 1, DecodingConfig(num_beams=1, max_new_tokens=6))
        assert row["text"] == alone.answers[0].text, row["id"]


def test_a_rerun_resumes_and_rewrites_only_missing_shards(local_ray, corpus, finished, tmp_path):
    manifest, _ = corpus
    output = copy_of(finished[1], tmp_path)
    first = {row["id"]: row["text"] for row in read_rows(output)}
    again = run(job_args(manifest, output))
    assert again["items_this_run"] == 0 and again["shards_skipped"] == 3
    (output / "mixed" / "part-00001.parquet").unlink()
    (output / "mixed" / "part-00002.parquet.tmp-crashed").write_bytes(b"half a file")
    resumed = run(job_args(manifest, output))
    assert resumed["items_this_run"] == 3 and resumed["shards_written"] == 1
    # the summary's rate is the wall-clock one, named so (the scores' items_per_s is the model phase's)
    assert resumed["wall_items_per_s"] == pytest.approx(3 / resumed["wall_s"], rel=0.01) and "items_per_s" not in resumed
    assert {row["id"]: row["text"] for row in read_rows(output)} == first


def test_an_output_made_with_other_settings_is_refused(local_ray, corpus, finished, tmp_path):
    output = copy_of(finished[1], tmp_path)
    for other in ("decoding.max_new_tokens=7", "signals.low_confidence_logprob=-2"):
        with pytest.raises(OutputMismatchError, match="another --output"):
            run(job_args(corpus[0], output, "--set", other))


def test_the_command_exits_1_for_failed_items_under_strict_and_2_for_a_mismatched_output(local_ray, corpus, tmp_path):
    manifest, _ = corpus
    argv = ["infer", "--manifest", str(manifest), "--model", "tiny", "--output", str(tmp_path / "out"), "--no-score", "--dry-run"]
    assert cli.main(argv) == 0  # four items failed, but without --strict that is a result
    assert cli.main([*argv, "--strict"]) == 1
    assert cli.main(argv[:-1]) == 2  # a model's rows would mix with the dry run's (tests/test_cli.py: the one line)


def test_the_job_reads_tar_shards_from_s3_and_writes_parquet_there(local_ray, corpus, tmp_path):
    with moto_server() as endpoint:
        # The Ray workers started before the test credentials were set: hand them over explicitly.
        options = {**endpoint, "key": "testing", "secret": "testing"}
        fs = s3_filesystem(options)
        fs.mkdir("infer-corpora")  # moto keeps buckets across servers in one process: a name of our own
        audio_dir = tmp_path / "audio"
        audio_dir.mkdir()
        for index in range(4):
            (audio_dir / f"clip{index}.wav").write_bytes(wav_bytes(tone(1.0 + index, freq=250.0 + 50 * index), 16000))
            (audio_dir / f"clip{index}.txt").write_text(f"clip number {index}")
        (audio_dir / "broken.wav").write_bytes(b"RIFF not really")
        manifest_url = build_shards(audio_dir, None, "s3corpus", "asr", "s3://infer-corpora/s3corpus/shard", 2, options)
        args = parse_args(["--manifest", manifest_url, "--model", "tiny", "--output", "s3://infer-corpora/predictions",
                           "--storage-options", json.dumps(options), *(arg for setting in TINY_SETTINGS for arg in ("--set", setting))])
        summary = run(args)
        parts = sorted(fs.glob("infer-corpora/predictions/s3corpus/part-*.parquet"))
        rows = [row for part in parts for row in pq.read_table(part, filesystem=fs).to_pylist()]
    assert len(parts) == 3 and summary["items"] == 5 and summary["errors"] == 1
    assert sorted(row["id"] for row in rows) == ["broken", "clip0", "clip1", "clip2", "clip3"]
    assert {row["id"]: row["error"] for row in rows}["broken"] == "not_audio"
    assert {row["id"]: row["reference"] for row in rows}["clip2"] == ["clip number 2"]
    assert all(row["audio"].startswith("s3://infer-corpora/s3corpus/shard-") for row in rows)


def test_a_shard_is_committed_whole_once_and_a_late_or_redone_copy_never_duplicates(tmp_path):
    from jobs.inference.settings import JobSettings
    from jobs.inference.write import ShardStaging, finish_shard, write_rows
    from jobs.predictions import OutputStore

    staging = ShardStaging(OutputStore(str(tmp_path), "late"))
    row = {name: None for name in OUTPUT_SCHEMA.names} | {"id": "a", "corpus": "late", "shard": 0, "index": 0}
    rows = [row, row | {"id": "b", "index": 1}, row | {"id": "c", "index": 2}]
    block = lambda *picked: pa.Table.from_pylist(list(picked), schema=OUTPUT_SCHEMA)  # noqa: E731
    part = Path(staging.store.part_path(0))

    assert write_rows(block(rows[0], rows[1]), staging).to_pylist() == [
        {"shard": 0, "staged_rows": 2, "staged_errors": 0, "staged_audio_seconds": 0.0, "first_answered_s": None,
         "last_answered_s": None, "committed_rows": None,
         "committed_audio_seconds": None}]
    staging.expect(0, 3)  # the read task's count arrives before the shard's last rows
    write_rows(block(rows[0], rows[1]), staging)  # a redone block: the same file again
    write_rows(block(rows[1] | {"text": "redone, cut differently"}), staging)  # overlaps the first
    assert not part.exists()
    assert write_rows(block(rows[2]), staging).to_pylist()[0]["committed_rows"] == 3
    assert [r["id"] for r in pq.read_table(part).to_pylist()] == ["a", "b", "c"]
    assert staging.staged_shards() == []

    write_rows(block(rows[1] | {"text": "late"}), staging)  # a late copy after the commit stays staged ...
    assert finish_shard(staging, 0, [], JobSettings("late", "job", "m", "{}")) is None  # ... and is dropped
    assert [r["text"] for r in pq.read_table(part).to_pylist()] == [None, None, None] and staging.staged_shards() == []


def test_items_the_pipeline_never_returned_get_a_lost_row(tmp_path):
    from jobs.inference.settings import JobSettings
    from jobs.inference.write import ShardStaging, finish_shard, write_rows
    from jobs.predictions import OutputStore

    staging = ShardStaging(OutputStore(str(tmp_path), "lost"))
    items = [{"id": f"i{index}", "shard": 4, "index": index, "source": "s", "audio": "a", "task": "asr", "prompt": None,
              "reference": None} for index in range(3)]
    staging.expect(4, 3)
    write_rows(pa.Table.from_pylist([{name: None for name in OUTPUT_SCHEMA.names} | items[1] | {"corpus": "lost"}],
                                    schema=OUTPUT_SCHEMA), staging)
    commit = finish_shard(staging, 4, items, JobSettings("lost", "job", "m", "{}"))
    assert commit is not None and commit.rows == 3
    got = pq.read_table(staging.store.part_path(4)).to_pylist()
    assert [(r["id"], r["error"]) for r in got] == [("i0", "lost"), ("i1", None), ("i2", "lost")]


def test_a_dry_run_reads_and_decodes_every_item_without_a_model_and_never_mixes_with_a_real_run(local_ray, tmp_path):
    audio_dir = tmp_path / "audio"
    audio_dir.mkdir()
    for index in range(5):
        (audio_dir / f"clip{index}.wav").write_bytes(wav_bytes(tone(0.5 + index, 8000 * (1 + index % 2), 1 + index % 2), 8000 * (1 + index % 2)))
    (audio_dir / "broken.wav").write_bytes(b"RIFF not really")
    manifest = build_shards(audio_dir, None, "dry", "asr", str(tmp_path / "shards" / "dry"), 3)
    last = tmp_path / "shards" / "dry-00001.tar"
    with tarfile.open(last) as tar:
        second_audio = [member for member in tar.getmembers() if member.name.endswith(".wav")][1]
    last.write_bytes(last.read_bytes()[:second_audio.offset_data + 100])  # one item before the damage

    summary = run(job_args(Path(manifest), tmp_path / "out", "--dry-run"))

    rows = [row for part in sorted((tmp_path / "out" / "dry").glob("part-*.parquet")) for row in pq.read_table(part).to_pylist()]
    assert [(row["shard"], row["index"], row["id"], row["error"]) for row in rows] == [
        (0, 0, "broken", "not_audio"), (0, 1, "clip0", None), (0, 2, "clip1", None),
        (1, 0, "clip2", None), (1, 1, f"{last}#corrupt", "corrupt_shard")]
    assert summary["dry_run"] and summary["items"] == 5 and summary["error_codes"] == {"corrupt_shard": 1, "not_audio": 1}
    clip1 = rows[2]
    assert clip1["audio_seconds"] == pytest.approx(1.5) and clip1["sample_rate"] == 16000 and clip1["channels"] == 2
    assert all(row["text"] is None and row["model"] == "dry-run" and row["model_s"] is None for row in rows)
    assert not (tmp_path / "out" / "dry" / "_staging").exists()
    with pytest.raises(OutputMismatchError, match="dry-run"):
        run(job_args(Path(manifest), tmp_path / "out"))


def test_decoding_ships_the_models_features_and_the_actor_uses_them():
    config = load_config("tiny")
    item = {"id": "a", "audio": "a.wav", "error": None, "task": "asr"}
    decoded = decode_item(dict(item), wav_bytes(tone(2.0), 16000), config.audio, features_for=config, skip_silence=False)
    clip = load_audio(wav_bytes(tone(2.0), 16000), config.audio)
    [features] = [ModelFeatures.from_bytes(piece) for piece in decoded["features"]]
    expected = compute_features([clip], config)[0]
    assert np.array_equal(features.whisper, expected.whisper) and np.array_equal(features.ced, expected.ced)
    assert decode_item(dict(item), wav_bytes(tone(2.0), 16000), config.audio)["features"] is None
    # a long recording ships one set of features per piece: here a caption's two fixed windows
    long = decode_item(dict(item, task="aac"), wav_bytes(tone(40.0), 16000), config.audio, features_for=config)
    first, second = (ModelFeatures.from_bytes(piece) for piece in long["features"])
    assert long["pieces"] == [(0, 480000), (480000, 640000)] and second.whisper.shape[1] < first.whisper.shape[1]
    too_short = decode_item(dict(item), wav_bytes(tone(0.01), 16000), config.audio.model_copy(update={"min_seconds": 0.0}),
                            features_for=config, skip_silence=False)
    assert too_short["error"] == "too_short" and too_short["features"] is None


def test_a_dry_runs_decode_computes_no_features_and_ships_no_waveform_but_finds_the_same_errors(monkeypatch):
    config = load_config("tiny")
    item = {"id": "a", "audio": "a.wav", "error": None, "task": "aac"}

    def no_features(*args, **kwargs):
        raise AssertionError("a dry run computed the model's features")

    monkeypatch.setattr("jobs.inference.decode.piece_features", no_features)
    long = decode_item(dict(item), wav_bytes(tone(40.0), 16000), config.audio, features_for=config, dry_run=True)
    assert long["error"] is None and long["waveform"] is None and long["features"] is None
    assert long["pieces"] == [(0, 480000), (480000, 640000)] and json.loads(long["clip"])["original_seconds"] == pytest.approx(40.0)
    short_audio = config.audio.model_copy(update={"min_seconds": 0.0})
    too_short = decode_item(dict(item), wav_bytes(tone(0.01), 16000), short_audio, features_for=config, dry_run=True)
    assert (too_short["error"], too_short["clip"]) == ("too_short", None)
