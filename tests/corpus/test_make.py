"""jobs.corpus.make: tar shards and manifests from a folder of audio, and the seed's files imported."""

from __future__ import annotations

import json
import os
import tarfile

import pytest

from jobs.corpus.make import build_shards, import_seed
from jobs.corpus.errors import ManifestError
from jobs.corpus.fetch import read_item_bytes
from jobs.corpus.manifest_schema import load_manifest
from jobs.manifest import main
from nota_model.errors import AudioError
from tests.corpus.test_manifest import audio_folder, rows, write_audio, write_jsonl
from tests.s3 import moto_fixture, s3_filesystem

s3 = pytest.fixture(scope="module")(moto_fixture)


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
