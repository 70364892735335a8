"""jobs.corpus.fetch: one item's audio bytes, with clear error codes and retries on transient errors."""

from __future__ import annotations


import pytest

from jobs.corpus import fetch
from jobs.corpus.fetch import read_item_bytes
from nota_model.errors import AudioError
from tests.corpus.test_manifest import write_audio
from tests.s3 import moto_fixture, s3_filesystem

s3 = pytest.fixture(scope="module")(moto_fixture)


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
