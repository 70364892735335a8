"""jobs.export: SRT and WebVTT cues from the word times or the segments' times (timestamps checked by hand),
JSONL lines; an output written before the language and word columns."""

import json
from urllib.parse import unquote

import pyarrow as pa

from jobs.command_line import run_command
from jobs.export import main
from jobs.predictions import OUTPUT_SCHEMA, OutputStore, parquet_bytes, read_predictions
from jobs.scoring.pipeline import score_predictions
from jobs.transcripts import MAX_CUE_SECONDS, MAX_LINE_CHARACTERS, MAX_LINES, MAX_STEM, file_stem, srt, timestamp, vtt, word_cues
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


def words_of(text: str, start: float, seconds_a_word: float, pause_after: dict[int, float] | None = None) -> list[dict]:
    """The text's words one after the other, `seconds_a_word` each, with pauses after the words `pause_after` names."""
    words, time = [], start
    for number, word in enumerate(text.split(" ")):
        words.append({"word": " " + word, "start": time, "end": time + seconds_a_word, "probability": 0.9})
        time += seconds_a_word + (pause_after or {}).get(number, 0.0)
    return words


def test_word_cues_start_at_a_pause_and_break_lines_between_words():
    words = words_of("And Mr. John Dashwood had then leisure to consider how much there might be. He was not", 1.0, 0.3,
                     pause_after={13: 0.8})
    item = row("a", 0, text="".join(w["word"] for w in words), words=words, segments=[{"start": 0.0, "end": 9.0, "text": "x"}])
    assert srt(item) == ("1\n00:00:01,000 --> 00:00:05,200\nAnd Mr. John Dashwood had then leisure to\n"
                         "consider how much there might be.\n\n"
                         "2\n00:00:06,000 --> 00:00:06,900\nHe was not\n")


def test_a_full_cue_ends_at_its_last_clause_not_a_word_into_the_next_sentence():
    sentence_end = words_of("Unless to be rather cold-hearted and rather selfish is to be ill-disposed. Had he married a more "
                            "amiable woman", 0.0, 0.25, pause_after={11: 0.3})
    assert [text for _, _, text in word_cues(sentence_end)] == [
        "Unless to be rather cold-hearted and\nrather selfish is to be ill-disposed.", "Had he married a more amiable woman"]
    title = words_of("He said that Mr. Smith and his wife had gone to the seaside town where they met the rest", 0.0, 0.25)
    assert [text for _, _, text in word_cues(title)] == [  # no pause after `Mr.`: no clause ends there
        "He said that Mr. Smith and his wife had\ngone to the seaside town where they met", "the rest"]


def test_word_cues_fit_two_lines_and_seven_seconds_and_a_long_word_is_a_line_of_its_own():
    slow = words_of(" ".join(["ab"] * 40), 0.0, 0.3)
    fast = words_of(" ".join(["abcdefghij"] * 13), 0.0, 0.1)
    for words in (slow, fast, words_of("a " + "x" * 50 + " b", 0.0, 0.2)):
        cues = word_cues(words)
        assert " ".join(text.replace("\n", " ") for _, _, text in cues) == " ".join(w["word"].strip() for w in words)
        assert all(end - start <= MAX_CUE_SECONDS and len(text.split("\n")) <= MAX_LINES for start, end, text in cues)
        assert all(len(line) <= MAX_LINE_CHARACTERS or " " not in line for _, _, text in cues for line in text.split("\n"))
        assert [start for start, _, _ in cues] == sorted(start for start, _, _ in cues)
    assert len(word_cues(slow)[0][2].split()) == 23  # 23 words of 0.3 s: 6.9 s, the 24th would pass 7 s
    assert [len(text.split()) for _, _, text in word_cues(fast)] == [6, 6, 1]  # three of 10 characters a line
    assert [text for _, _, text in word_cues(words_of("a " + "x" * 50 + " b", 0.0, 0.2))] == ["a\n" + "x" * 50, "b"]


def test_jsonl_carries_the_language_and_the_words(tmp_path):
    words = words_of("Hello there.", 0.5, 0.4)
    OutputStore(str(tmp_path / "predictions"), "speech").write_shard(0, [
        row("a", 0, text=" Hello there.", language="en", language_probability=0.98, words=words, audio_seconds=2.0)])
    assert main(["--predictions", str(tmp_path / "predictions"), "--format", "jsonl", "--output", str(tmp_path / "out")]) == 0
    (line,) = [json.loads(line) for line in (tmp_path / "out/speech.jsonl").read_text().splitlines()]
    assert (line["language"], line["language_probability"], line["words"]) == ("en", 0.98, words)


def test_an_output_written_before_the_language_and_word_columns_reads_them_as_null_scores_and_exports(tmp_path):
    old_schema = pa.schema([field for field in OUTPUT_SCHEMA if field.name not in ("language", "language_probability", "words")])
    rows = [row("a", 0, text="it was", reference=["it was"], segments=PIECES[:1], audio_seconds=29.48)]
    folder = tmp_path / "predictions/speech"
    folder.mkdir(parents=True)
    (folder / "part-00000.parquet").write_bytes(parquet_bytes(pa.Table.from_pylist(rows, schema=old_schema)))
    table = read_predictions(str(tmp_path / "predictions"))
    assert table.schema == OUTPUT_SCHEMA and table.select(["language", "language_probability", "words"]).to_pylist() == [
        {"language": None, "language_probability": None, "words": None}]
    (group,) = score_predictions(str(tmp_path / "predictions"), distributed=False).groups
    assert group["quality"]["wer"] == 0.0
    assert main(["--predictions", str(tmp_path / "predictions"), "--format", "srt", "--output", str(tmp_path / "srt")]) == 0
    assert (tmp_path / "srt/speech/a.srt").read_text() == "1\n00:00:00,000 --> 00:00:29,480\nIt was the best of times,\n"
