"""jobs.inference.plan.check_task: a corpus whose task the model has no prompt for is refused before any model
loads (every item would otherwise end as `invalid_prompt`)."""

from __future__ import annotations

import pytest

from jobs.command_line import run_command
from jobs.corpus.errors import ManifestError
from jobs.corpus.manifest_schema import Manifest
from jobs.infer import parse_args, run
from jobs.inference.plan import check_task
from nota_model.config import load_config
from tests.corpus.test_manifest import PROMPT, write_jsonl, write_manifest


def corpus(task: str, prompt: str | None = None) -> Manifest:
    return Manifest(name="c", task=task, prompt=prompt, items="/a.jsonl")


def test_the_tasks_of_the_models_prompts_pass_and_others_are_refused_by_name(tiny_config):
    for task in tiny_config.prompt.tasks:
        check_task(corpus(task), tiny_config)
    with pytest.raises(ManifestError, match=r"no prompt for task 'ASR': the known tasks are 'aac', 'asr' \(names are case"):
        check_task(corpus("ASR"), tiny_config)
    check_task(corpus("qa", PROMPT), tiny_config)  # a task of its own, with its prompt


def test_the_whisper_reference_model_takes_asr_without_a_prompt_only():
    whisper = load_config("whisper-base")
    check_task(corpus("asr"), whisper)
    with pytest.raises(ManifestError, match="no prompt for task 'aac': the known tasks are 'asr'"):
        check_task(corpus("aac"), whisper)
    with pytest.raises(ManifestError, match="takes no prompt"):
        check_task(corpus("asr", PROMPT), whisper)


def test_the_job_refuses_the_corpus_before_writing_anything(tmp_path, capsys):
    write_jsonl(tmp_path / "items.jsonl", [{"id": "u0", "audio": "u0.wav"}])
    manifest = write_manifest(tmp_path / "m.yaml", name="c", task="ASR", items="items.jsonl")
    flags = ["--manifest", str(manifest), "--model", "tiny", "--output", str(tmp_path / "out"), "--accelerator", "cpu"]
    assert run_command(lambda argv: run(parse_args(argv)), flags) == 2
    assert "no prompt for task 'ASR'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
