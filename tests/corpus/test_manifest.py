"""jobs.corpus.manifest_schema: manifests loaded and checked, item lists cut into shards and enumerated into work items;
the helpers here write the small corpora the other tests of jobs.corpus read too."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from jobs.command_line import run_command
from jobs.corpus.errors import ManifestError
from jobs.corpus.items import WORK_ITEM_SCHEMA
from jobs.corpus.manifest_schema import Manifest, load_manifest
from jobs.manifest import main
from jobs.samples import default_dest, fetch_animals, fetch_librivox
from nota_model.storage import cache_dir

REPO = Path(__file__).resolve().parents[2]
PROMPT = "<Speech><SpeechHere></Speech> Say it."


def write_audio(path: Path, seconds: float = 0.1, frequency: float = 440.0, format: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(path, 0.3 * np.sin(2 * np.pi * frequency * t), 16000, format=format)
    return path

def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path

def write_manifest(path: Path, **fields) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fields))  # JSON is YAML
    return path

def rows(table: pa.Table) -> list[dict]:
    return table.to_pylist()

def audio_folder(tmp_path: Path) -> Path:
    """Three clips of three formats, transcripts beside two of them."""
    folder = tmp_path / "audio"
    write_audio(folder / "a.wav", frequency=300)
    write_audio(folder / "b.flac", frequency=400)
    write_audio(folder / "sub" / "c.ogg", frequency=500, format="OGG")
    (folder / "a.txt").write_text("alpha\n")
    (folder / "sub" / "c.txt").write_text("gamma")
    return folder

def test_an_item_list_is_cut_into_shards_with_defaults_applied(tmp_path):
    items = [{"id": f"u{n}", "audio": f"clips/u{n}.wav"} for n in range(5)]
    items[1] |= {"reference": "one"}
    items[2] |= {"reference": ["two", "deux"], "task": "aac"}
    items[3] |= {"prompt": "<SpeechHere> Own prompt.", "task": "asr"}
    write_jsonl(tmp_path / "lists" / "items.jsonl", items)
    manifest = load_manifest(str(write_manifest(
        tmp_path / "m.yaml", name="c", task="asr", prompt=PROMPT, items="lists/items.jsonl", items_per_shard=2
    )))

    table = manifest.work_items()

    assert table.schema == WORK_ITEM_SCHEMA
    got = rows(table)
    assert [row["shard"] for row in got] == [0, 0, 1, 1, 2]
    assert [row["index"] for row in got] == [0, 1, 0, 1, 0]
    assert [row["id"] for row in got] == ["u0", "u1", "u2", "u3", "u4"]
    assert got[0]["audio"] == str(tmp_path / "lists" / "clips" / "u0.wav")
    assert got[0]["offset"] is None and got[0]["size"] is None and got[0]["member"] is None
    assert [row["reference"] for row in got] == [None, ["one"], ["two", "deux"], None, None]
    assert [row["task"] for row in got] == ["asr", "asr", "aac", "asr", "asr"]
    # The manifest's prompt is for its own task; an item's own prompt wins.
    assert [row["prompt"] for row in got] == [PROMPT, PROMPT, None, "<SpeechHere> Own prompt.", PROMPT]
    assert all(row["error"] is None and row["source"] == manifest.items for row in got)

def test_a_parquet_item_list_gives_the_same_work_items(tmp_path):
    items = [{"id": f"u{n}", "audio": f"/data/u{n}.wav", "reference": ["r", "s"] if n == 2 else None} for n in range(5)]
    pq.write_table(pa.Table.from_pylist(items), tmp_path / "items.parquet")
    manifest = Manifest(name="c", task="aac", items=str(tmp_path / "items.parquet"), items_per_shard=2)

    got = rows(manifest.work_items())

    assert [(row["shard"], row["index"]) for row in got] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert [row["reference"] for row in got] == [None, None, ["r", "s"], None, None]
    assert {row["task"] for row in got} == {"aac"} and got[4]["audio"] == "/data/u4.wav"

def test_bad_rows_are_error_items_and_every_row_is_kept(tmp_path):
    lines = [
        {"id": "a", "audio": "a.wav", "reference": "x"},
        {"id": "a", "audio": "again.wav", "reference": "x"},
        {"audio": "no-id.wav", "reference": "x"},
        {"id": "b", "reference": "x"},
        "{not json",
        {"id": "c", "audio": "c.wav", "reference": 7},
        {"id": "d", "audio": "d.wav", "prompt": "no placeholder", "reference": "x"},
        {"id": "e", "audio": "e.wav"},
        {"id": "f", "audio": "nosuchprotocol://f.wav", "reference": "x"},
        {"id": 7, "audio": "g.wav", "reference": ""},
    ]
    write_jsonl(tmp_path / "items.jsonl", lines)
    manifest = Manifest(name="c", task="asr", items=str(tmp_path / "items.jsonl"), require_reference=True)

    got = rows(manifest.work_items())

    assert [(row["id"], row["error"]) for row in got] == [
        ("a", None),
        ("a", "duplicate_id"),
        ("row-2", "invalid_item"),
        ("b", "invalid_item"),
        ("row-4", "invalid_item"),
        ("c", "invalid_item"),
        ("d", "invalid_item"),
        ("e", "missing_reference"),
        ("f", "invalid_item"),
        ("7", None),
    ]
    messages = {row["id"]: row["error_message"] for row in got}
    assert "no id" in messages["row-2"] and "no audio URL" in messages["b"] and "not JSON" in messages["row-4"]
    assert "reference" in messages["c"] and "<SpeechHere>" in messages["d"] and "nosuchprotocol" in messages["f"]
    assert got[-1]["reference"] == [""] and all(row["task"] == "asr" for row in got)

def test_environment_variables_and_relative_paths_resolve(tmp_path, monkeypatch):
    monkeypatch.setenv("CORPUS_ROOT", str(tmp_path / "corpus"))
    monkeypatch.delenv("NOTA_CACHE", raising=False)
    manifests = tmp_path / "manifests"

    def load(name: str, **input_url: str) -> Manifest:
        return load_manifest(str(write_manifest(manifests / f"{name}.yaml", name=name, task="asr", **input_url)))

    relative = load("a", items="../lists/x.jsonl")
    from_env = load("b", items="${CORPUS_ROOT}/x.jsonl")
    defaulted = load("c", shards="${UNSET_ROOT:-/srv}/*.tar")
    cached = load("d", items="${NOTA_CACHE}/x.jsonl")

    assert relative.items == str(tmp_path / "lists" / "x.jsonl")
    assert from_env.items == str(tmp_path / "corpus" / "x.jsonl")
    assert defaulted.shards == "/srv/*.tar"
    assert cached.items == str(cache_dir() / "x.jsonl")
    with pytest.raises(ManifestError, match="UNSET_ROOT is not set"):
        load("e", items="${UNSET_ROOT}/x.jsonl")

@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "x", "task": "asr"}, "exactly one input"),
        ({"name": "x", "task": "asr", "items": "a.jsonl", "shards": "*.tar"}, "exactly one input"),
        ({"name": "x y", "task": "asr", "items": "a.jsonl"}, "name"),
        ({"name": "x", "task": "asr", "items": "a.csv"}, "jsonl or .parquet"),
        ({"name": "x", "task": "asr", "items": "a.jsonl", "prompt": "Say it."}, "<SpeechHere>"),
        ({"name": "x", "task": "asr", "items": "a.jsonl", "item_list": "b"}, "item_list: Extra inputs"),
        ({"name": "x", "task": "asr", "items": "a.jsonl", "storage_options": "key=s3cr3t"}, "storage_options"),
    ],
)
def test_invalid_manifests_say_what_is_wrong_and_never_echo_values(tmp_path, fields, message):
    with pytest.raises(ManifestError, match=message) as caught:
        load_manifest(str(write_manifest(tmp_path / "m.yaml", **fields)))
    assert "s3cr3t" not in str(caught.value)

def test_unreadable_manifests_and_inputs_are_manifest_errors(tmp_path, capsys):
    with pytest.raises(ManifestError, match="no such manifest"):
        load_manifest(str(tmp_path / "missing.yaml"))
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ManifestError, match="not valid YAML at line"):
        load_manifest(str(tmp_path / "bad.yaml"))
    with pytest.raises(ManifestError, match="does not exist"):
        Manifest(name="x", task="asr", items=str(tmp_path / "none.jsonl")).work_items()
    with pytest.raises(ManifestError, match="matches no file"):
        Manifest(name="x", task="asr", shards=str(tmp_path / "none-*.tar")).work_items()
    assert run_command(main, ["validate", str(tmp_path / "missing.yaml")]) == 2
    assert "no such manifest" in capsys.readouterr().err

def test_a_task_no_model_has_a_prompt_for_is_refused_by_validate_and_build(tmp_path, capsys):
    write_jsonl(tmp_path / "items.jsonl", [{"id": "u0", "audio": "u0.wav"}, {"id": "u1", "audio": "u1.wav", "task": "aac"},
                                           {"id": "u2", "audio": "u2.wav", "task": "qa", "prompt": PROMPT}])
    refused = write_manifest(tmp_path / "refused.yaml", name="c", task="ASR", items="items.jsonl")
    assert run_command(main, ["validate", str(refused)]) == 2
    captured = capsys.readouterr()
    assert "no prompt for task 'ASR': the known tasks are 'aac', 'asr' (names are case-sensitive)" in captured.err
    assert captured.out == ""
    # Another task is fine where the items carry their own prompt (the seed's QA), and so is a prompted manifest.
    assert run_command(main, ["validate", str(write_manifest(tmp_path / "ok.yaml", name="c", task="asr",
                                                             items="items.jsonl"))]) == 0
    assert run_command(main, ["validate", str(write_manifest(tmp_path / "prompted.yaml", name="c", task="ASR", prompt=PROMPT,
                                                             items="items.jsonl"))]) == 0
    capsys.readouterr()
    build = ["build", "--audio-dir", str(audio_folder(tmp_path)), "--name", "c", "--task", "ASR", "--out", str(tmp_path / "c")]
    assert run_command(main, build) == 2
    assert "--task: no prompt for task 'ASR': the known tasks are 'aac', 'asr'" in capsys.readouterr().err
    assert not list(tmp_path.glob("c-*.tar")) and not (tmp_path / "c.yaml").exists()

def test_the_manifest_repr_hides_storage_options(tmp_path):
    secret = {"key": "AKIDSECRET", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://internal:9000"}}
    manifest = Manifest(name="x", task="asr", items="/a.jsonl", storage_options=secret)
    for text in (repr(manifest), str(manifest)):
        assert "s3cr3t" not in text and "AKIDSECRET" not in text and "internal" not in text
        assert "'key': '***'" in text and "client_kwargs" in text

def test_the_example_manifests_enumerate_the_sample_corpora(monkeypatch):
    monkeypatch.delenv("NOTA_CACHE", raising=False)
    fetch_librivox(default_dest())
    fetch_animals(default_dest())

    librivox = load_manifest(str(REPO / "manifests" / "librivox-sample.yaml")).work_items()
    animals = load_manifest(str(REPO / "manifests" / "animals-sample.yaml")).work_items()

    assert librivox.num_rows == 5 and librivox.column("error").null_count == 5
    assert librivox.column("reference").null_count == 0 and set(librivox.column("task").to_pylist()) == {"asr"}
    assert animals.num_rows == 10 and animals.column("error").null_count == 10
    assert set(animals.column("task").to_pylist()) == {"aac"}
