"""Weights from object storage: downloaded once into the cache, safely when several actors ask at once."""

from concurrent.futures import ThreadPoolExecutor

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
