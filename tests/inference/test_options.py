"""jobs.infer's typed run options: a YAML file, flags over it, unknown keys refused, every field described."""

from __future__ import annotations

from pathlib import Path

import pytest

from jobs.infer import parse_args
from jobs.inference.options import RunOptions
from nota_model.config import load_config
from nota_model.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_flags_override_the_file_and_the_mappings_merge_key_by_key(tmp_path):
    config = write(tmp_path / "run.yaml", "manifest: m.yaml\nmodel: tiny\noutput: out\nbatch_size: 4\n"
                   "overrides: {decoding: {num_beams: 2, max_new_tokens: 9}}\n"
                   "storage_options: {anon: true, client_kwargs: {region_name: eu}}\n")
    options = parse_args(["--config", config, "--batch-size", "16", "--set", "decoding.num_beams=1", "--dry-run",
                          "--storage-options", '{"client_kwargs": {"endpoint_url": "http://s3"}}'])
    assert (options.manifest, options.model, options.batch_size, options.dry_run) == ("m.yaml", "tiny", 16, True)
    assert options.overrides == {"decoding": {"num_beams": 1, "max_new_tokens": 9}}
    assert options.storage_options == {"anon": True, "client_kwargs": {"region_name": "eu", "endpoint_url": "http://s3"}}
    assert parse_args(["--config", config]).batch_size == 4


def test_flags_alone_give_the_same_options_as_before():
    options = parse_args(["--manifest", "m", "--model", "tiny", "--output", "o", "--set", "llm.path=/w", "--no-score"])
    assert options == RunOptions(manifest="m", model="tiny", output="o", overrides={"llm": {"path": "/w"}}, no_score=True)
    assert (options.batch_size, options.accelerator, options.storage_options) == (None, "auto", {})


def test_the_batch_size_is_the_model_configs_unless_the_run_gives_one():
    config = load_config("tiny", {"batch_size": 5})
    assert parse_args(["--manifest", "m", "--model", "tiny", "--output", "o"]).with_model_batch_size(config.batch_size).batch_size == 5
    given = parse_args(["--manifest", "m", "--model", "tiny", "--output", "o", "--batch-size", "3"])
    assert given.with_model_batch_size(config.batch_size).batch_size == 3


@pytest.mark.parametrize("text, message", [
    ("manifest: m\nmodel: tiny\noutput: o\nbatch_sise: 8\n", "batch_sise: Extra inputs are not permitted"),
    ("model: tiny\noutput: o\n", "manifest is missing (--manifest, or `manifest:` in --config)"),
    ("manifest: m\nmodel: tiny\noutput: o\naccelerator: tpu\n", "accelerator: Input should be 'auto', 'gpu' or 'cpu'"),
    ("- manifest: m\n", "run options are a YAML mapping"),
])
def test_bad_options_are_config_errors_that_say_what_is_wrong(tmp_path, text, message):
    with pytest.raises(ConfigError) as caught:
        parse_args(["--config", write(tmp_path / "run.yaml", text)])
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_every_option_is_described_and_is_a_flag(capsys):
    assert [name for name, field in RunOptions.model_fields.items() if not field.description] == []
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = capsys.readouterr().out
    flags = ["--set" if name == "overrides" else f"--{name.replace('_', '-')}" for name in RunOptions.model_fields]
    assert [flag for flag in flags if f" {flag} " not in help_text and f"[{flag}" not in help_text] == []
    words = " ".join(help_text.split())  # the defaults are shown, wherever argparse wraps the lines
    assert "(default: the model config's batch_size, 8 unless the preset says)" in words and "cpu: never (default: auto)" in words


def test_the_shipped_run_configs_are_valid_and_name_real_config_keys():
    for path in sorted(REPO.glob("configs/infer-*.yaml")):
        options = parse_args(["--config", str(path)])
        load_config(options.model, options.overrides)  # the overrides are the model config's own keys


def test_a_gpu_share_per_actor_is_one_over_a_whole_number_of_actors_per_gpu():
    args = ["--manifest", "m", "--model", "tiny", "--output", "o"]
    assert parse_args(args).actors_per_gpu == 1
    assert [parse_args([*args, "--gpus-per-actor", share]).actors_per_gpu for share in ("0.5", "0.333", "0.25")] == [2, 3, 4]
    for share, message in [("0.4", "gpus_per_actor 0.4 does not divide a GPU: give 1/k"),
                           ("0", "greater than 0"), ("1.5", "less than or equal to 1")]:
        with pytest.raises(ConfigError, match=message):
            parse_args([*args, "--gpus-per-actor", share])
    with pytest.raises(ConfigError, match="gpus_per_actor is for GPU runs.*drop --gpus-per-actor"):
        parse_args([*args, "--gpus-per-actor", "0.5", "--accelerator", "cpu"])
