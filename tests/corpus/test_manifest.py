from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from jobs.cli import run_command
from jobs.corpus import fetch, tars
from jobs.corpus.build import build_shards, import_seed
from jobs.corpus.errors import ManifestError
from jobs.corpus.fetch import read_item_bytes
from jobs.corpus.items import WORK_ITEM_SCHEMA
from jobs.corpus.manifest import Manifest, load_manifest
from jobs.manifest import main
from jobs.samples import default_dest, fetch_animals, fetch_librivox
from nota_model.errors import AudioError
from nota_model.storage import cache_dir
from tests.s3 import moto_fixture, s3_filesystem

REPO = Path(__file__).resolve().parents[2]
PROMPT = "<Speech><SpeechHere></Speech> Say it."

s3 = pytest.fixture(scope="module")(moto_fixture)


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


def test_built_shards_list_byte_ranges_that_hold_exactly_the_audio(tmp_path):
    folder = audio_folder(tmp_path)
    manifest_url = build_shards(folder, None, "mine", "asr", str(tmp_path / "out" / "mine"), items_per_shard=2)

    assert manifest_url == str(tmp_path / "out" / "mine.yaml")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mine-00000.tar", "mine-00001.tar", "mine.yaml"]
    manifest = load_manifest(manifest_url)
    got = rows(manifest.work_items())
    assert [(row["id"], row["shard"], row["index"]) for row in got] == [("a", 0, 0), ("b", 0, 1), ("sub/c", 1, 0)]
    assert [row["reference"] for row in got] == [["alpha"], None, ["gamma"]]
    assert [row["member"] for row in got] == ["000000.wav", "000001.flac", "000000.ogg"]
    for row, original in zip(got, ["a.wav", "b.flac", "sub/c.ogg"]):
        shard = str(tmp_path / "out" / f"mine-0000{row['shard']}.tar")
        assert row["error"] is None and row["audio"] == row["source"] == shard
        assert read_item_bytes(row, manifest.storage_options) == (folder / original).read_bytes()
        assert row["size"] == (folder / original).stat().st_size
    with pytest.raises(AudioError, match="truncated_audio"):
        read_item_bytes({**got[2], "size": got[2]["size"] + 10**6}, {})


@pytest.mark.parametrize("suffix", [".tsv", ".jsonl"])
def test_build_takes_references_from_a_file(tmp_path, suffix):
    folder = tmp_path / "audio"
    write_audio(folder / "a.wav")
    write_audio(folder / "b.wav")
    references = tmp_path / f"refs{suffix}"
    if suffix == ".tsv":
        references.write_text("a\ta dog barks\na\ta dog is barking\nghost\tno audio\n")
    else:
        write_jsonl(references, [{"id": "a", "reference": ["a dog barks", "a dog is barking"]},
                                 {"id": "ghost", "reference": "x"}])

    manifest = load_manifest(build_shards(folder, str(references), "dogs", "aac", str(tmp_path / "dogs")))

    got = rows(manifest.work_items())
    assert [(row["id"], row["reference"], row["task"]) for row in got] == [
        ("a", ["a dog barks", "a dog is barking"], "aac"),
        ("b", None, "aac"),
    ]


def test_build_refuses_to_mix_with_an_earlier_build(tmp_path):
    folder = audio_folder(tmp_path)
    build_shards(folder, None, "mine", "asr", str(tmp_path / "mine"))
    with pytest.raises(ManifestError, match="earlier build"):
        build_shards(folder, None, "mine", "asr", str(tmp_path / "mine"))


def test_the_build_command_prints_the_manifest_and_validate_summarizes_it(tmp_path, capsys):
    folder = audio_folder(tmp_path)
    out = str(tmp_path / "corpus")
    assert main(["build", "--audio-dir", str(folder), "--references", "none", "--name", "corpus", "--task", "asr",
                 "--out", out, "--items-per-shard", "2"]) == 0
    manifest_url = capsys.readouterr().out.strip()
    assert manifest_url == f"{out}.yaml"

    assert main(["validate", manifest_url]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary == {"name": "corpus", "source": f"{out}-?????.tar", "items": 3, "shards": 2, "errors": {},
                       "tasks": {"asr": 3}, "with_reference": 2}


def shard_with_three_items(tmp_path: Path) -> tuple[Path, list[int]]:
    """One tar shard of three items; also the byte offset of each item's first header."""
    folder = tmp_path / "audio"
    for name in ("a", "b", "c"):
        write_audio(folder / f"{name}.wav", seconds=0.05)
        (folder / f"{name}.txt").write_text(name)
    build_shards(folder, None, "abc", "asr", str(tmp_path / "abc"))
    shard = tmp_path / "abc-00000.tar"
    with tarfile.open(shard) as tar:
        starts = [member.offset for member in tar.getmembers() if member.name.endswith(".wav")]
    return shard, starts


@pytest.mark.parametrize("cut", ["inside audio", "at a header", "inside a header"])
def test_a_cut_shard_keeps_the_items_before_the_damage_and_adds_one_corrupt_shard_item(tmp_path, cut):
    shard, starts = shard_with_three_items(tmp_path)
    data = shard.read_bytes()
    end = {"inside audio": starts[1] + 512 + 100, "at a header": starts[2], "inside a header": starts[2] + 100}[cut]
    shard.write_bytes(data[:end])

    got = rows(load_manifest(str(tmp_path / "abc.yaml")).work_items())

    kept = ["a"] if cut == "inside audio" else ["a", "b"]
    assert [row["id"] for row in got] == [*kept, f"{shard}#corrupt"]
    assert [row["error"] for row in got] == [None] * len(kept) + ["corrupt_shard"]
    assert [row["index"] for row in got] == list(range(len(kept) + 1))
    assert str(shard) in got[-1]["error_message"]


def test_tar_keys_without_one_audio_member_are_invalid_items(tmp_path):
    write_audio(tmp_path / "x.wav")
    shard = tmp_path / "s-0.tar"
    with tarfile.open(shard, "w") as tar:
        tar.add(tmp_path / "x.wav", "k1.wav")
        tar.add(tmp_path / "x.wav", "k1.flac")
        tar.add(tmp_path / "x.wav", "dir/k2.wav")
        for name, text in [("dir/k2.json", b'{"reference": ["r1", "r2"], "task": "aac", "id": "two"}'),
                           ("k3.txt", b"only text"), ("k4.json", b"[1]")]:
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))

    got = rows(Manifest(name="s", task="asr", shards=str(tmp_path / "s-*.tar")).work_items())

    assert [(row["id"], row["error"]) for row in got] == [
        ("k1", "invalid_item"), ("two", None), ("k3", "invalid_item"), ("k4", "invalid_item")
    ]
    assert got[1]["reference"] == ["r1", "r2"] and got[1]["task"] == "aac" and got[1]["member"] == "dir/k2.wav"
    assert "k1.wav, k1.flac" in got[0]["error_message"]


def test_build_writes_hard_linked_files_as_regular_members(tmp_path):
    folder = tmp_path / "audio"
    write_audio(folder / "a.wav")
    for copy in ("b.wav", "sub/c.wav"):
        (folder / copy).parent.mkdir(parents=True, exist_ok=True)
        os.link(folder / "a.wav", folder / copy)

    manifest = load_manifest(build_shards(folder, None, "linked", "asr", str(tmp_path / "linked")))

    with tarfile.open(tmp_path / "linked-00000.tar") as tar:
        assert all(member.isfile() for member in tar.getmembers())
    got = rows(manifest.work_items())
    assert [(row["id"], row["error"]) for row in got] == [("a", None), ("b", None), ("sub/c", None)]
    assert all(read_item_bytes(row, {}) == (folder / "a.wav").read_bytes() for row in got)


def test_a_link_member_reads_as_the_audio_member_it_points_at_or_is_an_invalid_item(tmp_path):
    audio = write_audio(tmp_path / "x.wav").read_bytes()
    shard = tmp_path / "s-0.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("dir/k1.wav")
        info.size = len(audio)
        tar.addfile(info, io.BytesIO(audio))
        for name, kind, target in [("k2.wav", tarfile.LNKTYPE, "dir/k1.wav"), ("dir/k3.wav", tarfile.SYMTYPE, "k1.wav"),
                                   ("k4.wav", tarfile.LNKTYPE, "gone.wav")]:
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, target
            tar.addfile(link)

    got = rows(Manifest(name="s", task="asr", shards=str(tmp_path / "s-*.tar")).work_items())

    assert [(row["id"], row["error"]) for row in got] == [
        ("dir/k1", None), ("k2", None), ("dir/k3", None), ("k4", "invalid_item")
    ]
    assert all(read_item_bytes(row, {}) == audio for row in got[:3])
    assert "k4.wav is a link to gone.wav" in got[3]["error_message"]


def test_shard_reading_retries_transient_errors_and_keeps_an_unreadable_shard_as_one_item(tmp_path, monkeypatch):
    build_shards(audio_folder(tmp_path), None, "mine", "asr", str(tmp_path / "mine"), items_per_shard=2)
    manifest = load_manifest(str(tmp_path / "mine.yaml"))
    monkeypatch.setattr(tars.time, "sleep", lambda seconds: None)
    real_stream = tars._stream_shard
    failures = {str(tmp_path / "mine-00000.tar"): [ConnectionResetError("reset")],
                str(tmp_path / "mine-00001.tar"): [PermissionError("denied")]}

    def flaky_stream(url, *args):
        if failures[url]:
            raise failures[url].pop()
        return real_stream(url, *args)

    monkeypatch.setattr(tars, "_stream_shard", flaky_stream)
    got = rows(manifest.work_items())

    assert [(row["id"], row["shard"], row["error"]) for row in got] == [
        ("a", 0, None), ("b", 0, None), (f"{tmp_path / 'mine-00001.tar'}#unreadable", 1, "unreadable_shard")
    ]
    assert "denied" in got[2]["error_message"]


def test_a_stream_cut_by_a_transient_error_restarts_past_the_items_already_given(tmp_path, monkeypatch):
    shard, _ = shard_with_three_items(tmp_path)
    monkeypatch.setattr(tars.time, "sleep", lambda seconds: None)
    real_stream = tars._stream_shard
    attempts = []

    def reset_after_two_items(*args):
        attempts.append(args)
        for number, pair in enumerate(real_stream(*args)):
            if number == 2 and len(attempts) == 1:
                raise ConnectionResetError("reset")
            yield pair

    monkeypatch.setattr(tars, "_stream_shard", reset_after_two_items)
    got = list(tars.shard_items(str(shard), shard.stat().st_size, {}))

    assert [item["id"] for item, _ in got] == ["a", "b", "c"] and len(attempts) == 2
    assert all(data == read_item_bytes(item, {}) for item, data in got)


def test_seed_annotation_json_imports_as_an_item_list(tmp_path):
    seed = tmp_path / "seed" / "train.json"
    seed.parent.mkdir()
    seed.write_text(json.dumps({"annotation": [
        {"path": "wavs/one.wav", "text": "hello world", "task": "asr"},
        {"path": "/abs/cat.wav", "text": "a cat meows", "task": "audiocaption_v2"},
        {"path": "/abs/cat.wav", "text": "a cat is meowing", "task": "audiocaption_v2"},
        {"path": "/abs/cat.wav", "text": "yes", "task": "QA", "Q": "Is there a cat?"},
        {"path": "other/one.wav", "text": "again", "task": "asr"},
    ]}))
    out = tmp_path / "manifests" / "seed-train.yaml"

    main(["import-seed", str(seed), "--name", "seed-train", "--out", str(out), "--audio-root", "/data"])

    items = [json.loads(line) for line in (tmp_path / "manifests" / "seed-train.jsonl").read_text().splitlines()]
    assert items == [
        {"id": "one", "audio": "/data/wavs/one.wav", "task": "asr", "reference": "hello world"},
        {"id": "cat", "audio": "/abs/cat.wav", "task": "aac", "reference": ["a cat meows", "a cat is meowing"]},
        {"id": "cat-3", "audio": "/abs/cat.wav", "task": "QA",
         "prompt": "<Speech><SpeechHere></Speech> Is there a cat?", "reference": "yes"},
        {"id": "one-4", "audio": "/data/other/one.wav", "task": "asr", "reference": "again"},
    ]
    manifest = load_manifest(str(out))
    assert manifest.task == "asr" and manifest.items == str(tmp_path / "manifests" / "seed-train.jsonl")
    assert [row["error"] for row in rows(manifest.work_items())] == [None] * 4


def test_a_seed_test_list_imports_with_its_ids_and_paths_beside_it(tmp_path):
    seed = tmp_path / "test_aac.json"
    seed.write_text(json.dumps([
        {"testset_id": "t-001", "path": "clips/1.wav", "task": "audiocaption"},
        {"testset_id": "t-002", "path": "clips/2.wav", "task": "audiocaption"},
    ]))

    manifest = load_manifest(import_seed(str(seed), "aac-test", str(tmp_path / "aac-test.yaml")))

    got = rows(manifest.work_items())
    assert [(row["id"], row["audio"], row["task"], row["reference"]) for row in got] == [
        ("t-001", str(tmp_path / "clips" / "1.wav"), "aac", None),
        ("t-002", str(tmp_path / "clips" / "2.wav"), "aac", None),
    ]


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


def test_the_manifest_repr_hides_storage_options(tmp_path):
    secret = {"key": "AKIDSECRET", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://internal:9000"}}
    manifest = Manifest(name="x", task="asr", items="/a.jsonl", storage_options=secret)
    for text in (repr(manifest), str(manifest)):
        assert "s3cr3t" not in text and "AKIDSECRET" not in text and "internal" not in text
        assert "'key': '***'" in text and "client_kwargs" in text


def test_reading_a_missing_file_is_missing_audio(tmp_path):
    with pytest.raises(AudioError) as caught:
        read_item_bytes({"audio": str(tmp_path / "gone.wav"), "offset": None, "size": None}, {})
    assert caught.value.code == "missing_audio" and "gone.wav" in caught.value.message


def test_reading_a_directory_says_it_is_one(tmp_path, s3):
    (tmp_path / "clips").mkdir()
    s3_filesystem(s3).mkdir("folders")
    s3_filesystem(s3).pipe("folders/clips/a.wav", write_audio(tmp_path / "a.wav").read_bytes())
    for url, options in [(str(tmp_path / "clips"), {}), ("s3://folders/clips", s3)]:
        with pytest.raises(AudioError) as caught:
            read_item_bytes({"audio": url}, options)
        assert caught.value.code == "not_audio" and caught.value.message == f"{url} is a directory, not an audio file"


def test_transient_errors_are_retried_with_backoff_and_permanent_ones_are_not(tmp_path, monkeypatch):
    clip = write_audio(tmp_path / "a.wav")
    waits: list[float] = []
    monkeypatch.setattr(fetch.time, "sleep", waits.append)
    real_cat = fetch.fsspec.implementations.local.LocalFileSystem.cat_file
    failures = [ConnectionResetError("connection reset"), TimeoutError("timed out")]

    def flaky_cat(self, path, *args, **kwargs):
        if failures:
            raise failures.pop(0)
        return real_cat(self, path, *args, **kwargs)

    monkeypatch.setattr(fetch.fsspec.implementations.local.LocalFileSystem, "cat_file", flaky_cat)
    assert read_item_bytes({"audio": str(clip)}, {}) == clip.read_bytes()
    assert waits == [0.5, 1.0]

    failures.extend([OSError("flaky")] * 4)
    with pytest.raises(AudioError, match="read_failed"):
        read_item_bytes({"audio": str(clip)}, {})
    assert waits == [0.5, 1.0, 0.5, 1.0, 2.0]

    failures.append(PermissionError("denied"))
    with pytest.raises(AudioError, match="forbidden_audio"):
        read_item_bytes({"audio": str(clip)}, {})
    assert len(waits) == 5


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


def test_shards_on_s3_build_list_and_read_back(tmp_path, s3):
    s3_filesystem(s3).mkdir("corpora")
    folder = audio_folder(tmp_path)

    assert main(["build", "--audio-dir", str(folder), "--name", "c", "--task", "asr", "--out", "s3://corpora/c",
                 "--items-per-shard", "2", "--storage-options", json.dumps(s3)]) == 0
    manifest = load_manifest("s3://corpora/c.yaml", s3)

    assert manifest.storage_options == s3 and manifest.shards == "s3://corpora/c-?????.tar"
    got = rows(manifest.work_items())
    assert [(row["id"], row["shard"], row["index"], row["error"]) for row in got] == [
        ("a", 0, 0, None), ("b", 0, 1, None), ("sub/c", 1, 0, None)
    ]
    assert got[0]["audio"] == "s3://corpora/c-00000.tar" and got[2]["reference"] == ["gamma"]
    for row, original in zip(got, ["a.wav", "b.flac", "sub/c.ogg"]):
        assert read_item_bytes(row, manifest.storage_options) == (folder / original).read_bytes()
    with pytest.raises(AudioError, match="missing_audio"):
        read_item_bytes({"audio": "s3://corpora/none.wav"}, manifest.storage_options)
