"""The job's Parquet output: an explicit schema, one file per input shard, written atomically.

Layout under the output URL: a folder per corpus; every file carries all columns (`corpus` too), so
DuckDB, pandas and Spark read `OUTPUT/**/*.parquet` (or the folder) directly:

    OUTPUT/NAME/part-00000.parquet   one file per input shard, complete or absent
    OUTPUT/NAME/_staging/            rows of shards not yet complete (jobs.inference.write), removed on commit
    OUTPUT/NAME/_RUN.json            model identity and decoding the files were made with
    OUTPUT/NAME/_SUCCESS.json        summary of the last run that finished

A rerun with the same output skips the shards whose file exists: a file is only ever visible whole. An output
in an object-store bucket that does not exist is refused (`require_bucket`), never created.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from nota_model.config import DecodingConfig
from nota_model.errors import NotaError
from nota_model.storage import write_bytes_atomically

OUTPUT_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("corpus", pa.string(), nullable=False),
        pa.field("shard", pa.int32(), nullable=False),
        pa.field("index", pa.int32(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("audio", pa.string()),
        pa.field("task", pa.string()),
        pa.field("prompt", pa.string()),
        pa.field("reference", pa.list_(pa.string())),
        pa.field("text", pa.string()),
        pa.field(
            "segments",
            pa.list_(pa.struct([pa.field("start", pa.float64()), pa.field("end", pa.float64()), pa.field("text", pa.string())])),
        ),
        pa.field("language", pa.string()),
        pa.field("language_probability", pa.float64()),
        pa.field(
            "words",
            pa.list_(pa.struct([pa.field("word", pa.string()), pa.field("start", pa.float64()), pa.field("end", pa.float64()),
                                pa.field("probability", pa.float64())])),
        ),
        # what the row says about how far to trust it (nota_model.signals); null where a model cannot tell
        pa.field("speech_share", pa.float64()),
        pa.field("mean_logprob", pa.float64()),
        pa.field("compression_ratio", pa.float64()),
        pa.field("flags", pa.list_(pa.string())),
        pa.field("error", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("audio_seconds", pa.float64()),
        pa.field("truncated", pa.bool_()),
        pa.field("sample_rate", pa.int32()),
        pa.field("channels", pa.int32()),
        pa.field("model", pa.string()),
        pa.field("decoding", pa.string()),
        pa.field("output_tokens", pa.int32()),
        pa.field("ttft_s", pa.float64()),
        pa.field("tpot_s", pa.float64()),
        pa.field("batch_size", pa.int32()),
        pa.field("model_s", pa.float64()),
        pa.field("actor_cpu_s", pa.float64()),  # the model actor's CPU time outside model.generate, per item of its batch
        pa.field("worker", pa.string()),
        pa.field("job_id", pa.string()),
        pa.field("created_at", pa.timestamp("us", tz="UTC")),
    ]
)

PART_NAME = re.compile(r"part-(\d{5,})\.parquet$")
LEGACY_RUN_KEYS = {"long_audio": "long_form"}  # outputs of earlier versions stay resumable
# fsspec protocols whose first path part is a bucket, which their `makedirs` would create.
BUCKET_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


class OutputMismatchError(NotaError):
    """The output already holds results made with another model or decoding."""


class RepeatedRunsError(NotaError):
    """Predictions to score together hold one corpus answered by one model in more than one output."""


class MissingBucketError(NotaError):
    """An output URL names an object-store bucket that does not exist."""


def require_bucket(url: str, storage_options: dict[str, Any] | None = None) -> None:
    """Refuse an output in a bucket that does not exist: the object store's `makedirs` would create it, with
    the account's default region and policy, and a mistyped bucket would quietly receive a whole run."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & BUCKET_PROTOCOLS:
        return
    bucket = path.split("/", 1)[0]
    if not fs.exists(bucket):
        raise MissingBucketError(f"bucket {bucket} does not exist: create it first, or correct the output URL {url}")


class OutputStore:
    def __init__(self, url: str, corpus: str, storage_options: dict[str, Any] | None = None):
        require_bucket(url, storage_options)
        self.fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        self.dir = f"{root.rstrip('/')}/{corpus}"
        self.url = url
        self.fs.makedirs(self.dir, exist_ok=True)

    def part_path(self, shard: int) -> str:
        return f"{self.dir}/part-{shard:05d}.parquet"

    def completed_shards(self) -> set[int]:
        self.fs.invalidate_cache(self.dir)  # s3fs keeps listings: the cluster writes the part files
        names = (path.rsplit("/", 1)[-1] for path in self.fs.ls(self.dir, detail=False))
        return {int(match[1]) for name in names if (match := PART_NAME.fullmatch(name))}

    def write_shard(self, shard: int, rows: pa.Table | list[dict[str, Any]]) -> None:
        """The shard's part file, rows in index order, in one atomic write."""
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
        write_bytes_atomically(self.fs, self.part_path(shard), parquet_bytes(table.sort_by("index")))

    def claim(self, run: dict[str, Any]) -> None:
        """Record what this output is made with, or refuse to mix in results of another model or decoding."""
        path = f"{self.dir}/_RUN.json"
        if self.fs.exists(path):
            recorded = _as_today(json.loads(self.fs.cat_file(path)))
            if recorded != run:
                raise OutputMismatchError(
                    f"{self.url} (corpus {self.dir.rsplit('/', 1)[-1]}) holds results of {recorded}, not {run} "
                    f"({_differences(recorded, run)}): write to another --output, or delete it to start over"
                )
            return
        write_bytes_atomically(self.fs, path, json.dumps(run, indent=2).encode())

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_bytes_atomically(self.fs, f"{self.dir}/_SUCCESS.json", json.dumps(summary, indent=2).encode())

    def counts(self) -> tuple[int, Counter[str]]:
        """Rows of every part file, and rows with each error code: one part file's `error` column at a time."""
        rows, errors = 0, Counter()
        for shard in self.completed_shards():
            with self.fs.open(self.part_path(shard), "rb") as file:
                column = pq.read_table(file, columns=["error"]).column("error")
            rows += len(column)
            errors.update({entry["values"]: entry["counts"] for entry in column.drop_null().value_counts().to_pylist()})
        return rows, errors


def _as_today(run: dict[str, Any]) -> dict[str, Any]:
    """A `_RUN.json` as today's job would write it: a key renamed since (`long_audio`) under today's name, and its
    decoding read as today's `DecodingConfig`, so that a setting added since takes its default, which is what the
    output was made with (`word_timestamps`: false). A decoding that is no `DecodingConfig` is kept as it is."""
    today = {LEGACY_RUN_KEYS.get(key, key): value for key, value in run.items()}
    try:
        today["decoding"] = DecodingConfig.model_validate_json(today["decoding"]).model_dump_json()
    except (KeyError, TypeError, ValueError):  # pydantic's ValidationError is a ValueError
        pass
    return today


def _differences(recorded: dict[str, Any], run: dict[str, Any]) -> str:
    """Which settings differ, decoding's one by one: `decoding.word_timestamps false there, true here`."""
    def flat(settings: dict[str, Any]) -> dict[str, Any]:
        decoding = _json_object(settings.get("decoding"))
        return {**{key: value for key, value in settings.items() if key != "decoding" or decoding is None},
                **{f"decoding.{key}": value for key, value in (decoding or {}).items()}}

    there, here = flat(recorded), flat(run)
    return "; ".join(f"{key} {json.dumps(there.get(key))} there, {json.dumps(here.get(key))} here"
                     for key in sorted(there.keys() | here.keys()) if there.get(key) != here.get(key))


def _json_object(text: Any) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def parquet_bytes(table: pa.Table) -> bytes:
    """A whole Parquet file in memory (zstd), for one atomic write."""
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def prediction_files(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, dict[str, Any]]:
    """The part files under `root` (or `root` itself, a file) and their listings (size, ETag or mtime);
    folders named `_…` (scores) are not predictions. None where `root` or its bucket does not exist (the callers
    say "holds no prediction files" rather than the object store's traceback)."""
    if fs.isfile(root):
        return {root: fs.info(root)}
    try:
        listing = fs.find(root, detail=True)
    except FileNotFoundError:  # s3fs: the bucket does not exist
        return {}
    return {path: info for path, info in listing.items() if PART_NAME.search(path) and "/_" not in path[len(root):]}


def require_one_run_per_group(fs: fsspec.AbstractFileSystem, files: Iterable[str]) -> None:
    """Refuse predictions holding the same corpus answered by the same model in two outputs (two runs scored
    together): their items would count twice, and a group's figures would mix the runs. A corpus folder holds
    one model's rows (`OutputStore.claim`), so its first part file names the model."""
    folders: dict[str, list[str]] = {}
    for path in files:
        folders.setdefault(path.rsplit("/", 1)[0], []).append(path)
    runs: dict[tuple[str, str], list[str]] = {}
    for folder, paths in sorted(folders.items()):
        with fs.open(min(paths), "rb") as file:
            models = pq.read_table(file, columns=["model"]).column("model").drop_null()
        if len(models):
            runs.setdefault((folder.rsplit("/", 1)[-1], models[0].as_py()), []).append(folder)
    repeated = {key: found for key, found in runs.items() if len(found) > 1}
    if repeated:
        (corpus, model), found = next(iter(repeated.items()))
        raise RepeatedRunsError(
            f"corpus {corpus} answered by {model} is in {len(found)} outputs ({', '.join(found)}): its items would count "
            "more than once; score each output on its own (--predictions OUTPUT), or compare them with `nota-batch rescore`")


def read_predictions(url: str, storage_options: dict[str, Any] | None = None, columns: list[str] | None = None) -> pa.Table:
    """Every part file under `url`: a job's output (all corpora), one corpus folder, or one part file.
    Files written before a column existed read it as null."""
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    paths = sorted(prediction_files(fs, root))
    if not paths:
        raise NotaError(f"{url} holds no prediction files (part-NNNNN.parquet): check the --predictions URL")
    return ds.dataset(paths, schema=OUTPUT_SCHEMA, format="parquet", filesystem=fs).to_table(columns=columns)
