"""An output in an S3 bucket that does not exist is refused up front (exit 2), never created: by the batch job,
the scorer (its output and its submission CSVs) and the export."""

from __future__ import annotations

import json

import pytest

from jobs.command_line import run_command
from jobs.infer import parse_args, run
from jobs.predictions import MissingBucketError, OutputStore, require_bucket
from jobs.scoring.scorer import score
from jobs.transcripts import export
from nota_model.errors import NotaError
from tests.corpus.test_manifest import write_jsonl, write_manifest
from tests.s3 import moto_fixture, s3_filesystem

s3 = pytest.fixture(scope="module")(moto_fixture)
MISSING = "no-such-bucket-for-outputs"  # moto keeps buckets across servers in one process: no test creates it


def test_a_missing_bucket_is_refused_and_an_existing_one_or_a_local_folder_is_not(s3, tmp_path):
    with pytest.raises(MissingBucketError, match=f"bucket {MISSING} does not exist: create it first"):
        require_bucket(f"s3://{MISSING}/predictions", s3)
    s3_filesystem(s3).mkdir("outputs-bucket-here")
    require_bucket("s3://outputs-bucket-here/predictions", s3)
    require_bucket(str(tmp_path / "predictions"))
    assert not s3_filesystem(s3).exists(MISSING)


def test_the_job_refuses_an_output_in_a_missing_bucket(s3, tmp_path, capsys):
    write_jsonl(tmp_path / "items.jsonl", [{"id": "u0", "audio": "u0.wav"}])
    manifest = write_manifest(tmp_path / "m.yaml", name="c", task="asr", items="items.jsonl")
    flags = ["--manifest", str(manifest), "--model", "tiny", "--output", f"s3://{MISSING}/predictions", "--dry-run",
             "--accelerator", "cpu", "--storage-options", json.dumps(s3)]
    assert run_command(lambda argv: run(parse_args(argv)), flags) == 2
    assert f"bucket {MISSING} does not exist: create it first" in capsys.readouterr().err
    assert not s3_filesystem(s3).exists(MISSING)


def test_the_scorer_refuses_an_output_or_submission_in_a_missing_bucket(s3, tmp_path):
    OutputStore(str(tmp_path / "predictions"), "speech").write_shard(0, [])
    for output, submission in ((f"s3://{MISSING}/scores", None), (str(tmp_path / "scores"), f"s3://{MISSING}/csv")):
        with pytest.raises(MissingBucketError, match=f"bucket {MISSING} does not exist"):
            score(str(tmp_path / "predictions"), output, submission=submission, storage_options=s3)
    assert not s3_filesystem(s3).exists(MISSING) and not (tmp_path / "scores").exists()


def test_the_export_refuses_an_output_in_a_missing_bucket(s3, tmp_path):
    OutputStore(str(tmp_path / "predictions"), "speech").write_shard(0, [])
    with pytest.raises(MissingBucketError, match=f"bucket {MISSING} does not exist"):
        export(str(tmp_path / "predictions"), f"s3://{MISSING}/subtitles", "vtt", s3)
    assert not s3_filesystem(s3).exists(MISSING)


def test_predictions_in_a_missing_bucket_are_one_error_line_not_the_stores_traceback(s3, tmp_path):
    with pytest.raises(NotaError, match=f"s3://{MISSING}/predictions holds no prediction files"):
        export(f"s3://{MISSING}/predictions", str(tmp_path / "subtitles"), "srt", s3)
    with pytest.raises(NotaError, match=f"s3://{MISSING}/predictions holds no prediction files"):
        score(f"s3://{MISSING}/predictions", str(tmp_path / "scores"), storage_options=s3)
