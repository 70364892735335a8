"""jobs.export: SRT and WebVTT cues from the segments' times (timestamps checked by hand), JSONL lines."""

import json
from jobs.command_line import run_command
from jobs.export import main
from jobs.predictions import OutputStore
from urllib.parse import unquote

from jobs.transcripts import MAX_STEM, file_stem, srt, timestamp, vtt
from tests.scoring.test_score import row

PIECES = [{"start": 0.0, "end": 29.48, "text": " It was the best of times,"},
          {"start": 29.48, "end": 3725.4567, "text": "it was the worst of times. "}]


def test_timestamps_by_hand():
    assert timestamp(3725.4567, ",") == "01:02:05,457"
    assert timestamp(59.9996, ".") == "00:01:00.000"  # to the nearest millisecond, carried into the minute
    assert timestamp(0.001, ",") == "00:00:00,001" and timestamp(36000.25, ".") == "10:00:00.250"


def test_srt_and_vtt_cues_from_the_segments():
    item = row("book/ch-1", 0, text="It was the best of times, it was the worst of times.", segments=PIECES, audio_seconds=3800.0)
    assert srt(item) == ("1\n00:00:00,000 --> 00:00:29,480\nIt was the best of times,\n\n"
                         "2\n00:00:29,480 --> 01:02:05,457\nit was the worst of times.\n")
    assert vtt(item) == ("WEBVTT\n\nNOTE id=book%2Fch-1\n\n00:00:00.000 --> 00:00:29.480\nIt was the best of times,\n\n"
                         "00:00:29.480 --> 01:02:05.457\nit was the worst of times.\n")


def test_an_item_without_segments_is_one_cue_over_its_audio():
    assert srt(row("a", 0, text="Hello there.", audio_seconds=2.5)) == "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n"


def write(tmp_path) -> str:
    rows = [row("book/ch-1", 0, text="It was.", segments=PIECES[:1], audio_seconds=29.48),
            row("b", 1, text=None, error="not_audio", error_message="not audio"),
            row("c", 2, text="Hello.", audio_seconds=1.25)]
    store = OutputStore(str(tmp_path / "predictions"), "speech")
    store.write_shard(1, rows[2:])
    store.write_shard(0, rows[:2])
    return str(tmp_path / "predictions")


def test_export_writes_a_subtitle_file_an_item_and_skips_errors(tmp_path, capsys):
    predictions = write(tmp_path)
    for kind in ("srt", "vtt"):
        assert main(["--predictions", predictions, "--format", kind, "--output", str(tmp_path / kind)]) == 0
        assert capsys.readouterr().out == f"2 items written to {tmp_path / kind}, 1 skipped (an error or no text)\n"
        assert sorted(p.name for p in (tmp_path / kind / "speech").iterdir()) == [f"book%2Fch-1.{kind}", f"c.{kind}"]
    assert (tmp_path / "vtt/speech/c.vtt").read_text() == "WEBVTT\n\nNOTE id=c\n\n00:00:00.000 --> 00:00:01.250\nHello.\n"


IDS_THAT_FLATTENED_ALIKE = ["a/b", "a_b", "a b", "café", "cafè", "cafe\u0301", "50%", "50%25", "~x", "%7Ex", ".", "..", "%2E"]


def test_file_names_give_the_id_back_and_never_collide():
    stems = [file_stem(item_id) for item_id in IDS_THAT_FLATTENED_ALIKE]
    assert [unquote(stem) for stem in stems] == IDS_THAT_FLATTENED_ALIKE
    assert len(set(stems)) == len(stems)
    assert all("/" not in stem and not stem.startswith(".") for stem in stems)


def test_a_long_id_is_cut_to_a_name_with_its_hash():
    long_ids = ["x" * 300, "x" * 299 + "y", "é" * 300]
    stems = [file_stem(item_id) for item_id in long_ids]
    assert all(len(stem) == MAX_STEM and "~" in stem for stem in stems) and len(set(stems)) == 3
    assert file_stem("x" * MAX_STEM) == "x" * MAX_STEM


def test_every_item_gets_its_own_file_and_a_repeated_id_is_counted(tmp_path, capsys):
    rows = [row(item_id, index, text=f"text {index}", audio_seconds=1.0)
            for index, item_id in enumerate(["a/b", "a_b", "café", "cafè", "a_b"])]
    OutputStore(str(tmp_path / "predictions"), "speech").write_shard(0, rows)
    assert main(["--predictions", str(tmp_path / "predictions"), "--format", "vtt", "--output", str(tmp_path / "vtt")]) == 0
    assert capsys.readouterr().out.startswith(f"4 items written to {tmp_path / 'vtt'}, 1 skipped (an id written before")
    files = {unquote(path.stem): path.read_text() for path in (tmp_path / "vtt/speech").iterdir()}
    assert sorted(files) == sorted(["a/b", "a_b", "café", "cafè"])
    assert "NOTE id=a%2Fb\n" in files["a/b"] and files["a_b"].endswith("text 1\n")


def test_export_jsonl_has_a_line_an_item_in_corpus_order(tmp_path):
    predictions = write(tmp_path)
    assert main(["--predictions", predictions, "--format", "jsonl", "--output", str(tmp_path / "out")]) == 0
    lines = [json.loads(line) for line in (tmp_path / "out/speech.jsonl").read_text().splitlines()]
    assert [(line["id"], line["error"]) for line in lines] == [("book/ch-1", None), ("b", "not_audio"), ("c", None)]
    assert lines[0]["segments"] == [{"start": 0.0, "end": 29.48, "text": " It was the best of times,"}]


def test_no_predictions_is_a_clear_error(tmp_path, capsys):
    assert run_command(main, ["--predictions", str(tmp_path), "--format", "srt", "--output", str(tmp_path / "out")]) == 2
    assert "no prediction files" in capsys.readouterr().err
