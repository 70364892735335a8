"""jobs.corpus.tars: WebDataset tar shards streamed into items, damage kept as error items, transient errors retried."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from jobs.corpus import tars
from jobs.corpus.make import build_shards
from jobs.corpus.fetch import read_item_bytes
from jobs.corpus.manifest_schema import Manifest, load_manifest
from tests.corpus.test_manifest import audio_folder, rows, write_audio


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
