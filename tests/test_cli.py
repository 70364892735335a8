"""The `nota-batch` command and its exit codes: 0 done, 2 a usage, config or manifest error in one line (the
traceback only with --debug); `python -m jobs.X` exits the same. Exit 1 (`infer --strict`) and the
output-mismatch 2 are in tests/inference/test_infer.py, since they need a job run."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import cli

REPO = Path(__file__).resolve().parents[1]


def item_list_manifest(folder: Path) -> Path:
    (folder / "items.jsonl").write_text(json.dumps({"id": "a", "audio": "a.wav", "reference": "hello"}) + "\n")
    manifest = folder / "corpus.yaml"
    manifest.write_text("name: corpus\ntask: asr\nitems: items.jsonl\n")
    return manifest


def test_version_and_help_exit_0(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("nota-batch 0.")


def test_every_command_module_is_registered_and_in_the_help(capsys):
    """A `jobs/X.py` with a `main` is a command: in the registry, in the usage line and in the list of commands."""
    modules = {f"jobs.{path.stem}" for path in (REPO / "jobs").glob("*.py")
               if path.stem != "cli" and re.search(r"^def main\(", path.read_text(), re.MULTILINE)}
    assert {module for module, _ in cli.COMMANDS.values()} == modules
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    out = capsys.readouterr().out
    usage, listing = out.split("\n", 1)[0], out.split("commands:\n", 1)[1]
    assert done.value.code == 0
    assert all(name in usage and re.search(rf"^  {name} ", listing, re.MULTILINE) for name in cli.COMMANDS)


def test_a_command_runs_its_module_and_exits_0(tmp_path, capsys):
    assert cli.main(["manifest", "validate", str(item_list_manifest(tmp_path))]) == 0
    assert json.loads(capsys.readouterr().out)["items"] == 1


@pytest.mark.parametrize("argv", [[], ["nope"], ["manifest", "frobnicate"], ["score", "--predictions", "x"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    assert done.value.code == 2 and "usage: nota-batch" in capsys.readouterr().err


def test_a_bad_manifest_is_one_line_and_exit_2_and_debug_adds_the_traceback(tmp_path, capsys):
    missing = str(tmp_path / "missing.yaml")
    assert cli.main(["manifest", "validate", missing]) == 2
    err = capsys.readouterr().err
    assert err == f"nota-batch manifest: error: {missing}: no such manifest; check the path\n"
    assert cli.main(["--debug", "manifest", "validate", missing]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ManifestError" in err and err.endswith("no such manifest; check the path\n")


def test_a_bad_config_exits_2(tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text("run: {name: x, storage_path: /tmp/x, max_steps: 1}\ndatasets: {train: [m.yaml]}\nunknown: 1\n")
    assert cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nota-batch train: error: invalid training config") and "unknown" in err and err.count("\n") == 1


def test_python_m_exits_the_same_way(tmp_path):
    done = subprocess.run([sys.executable, "-m", "jobs.manifest", "validate", str(tmp_path / "missing.yaml")],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 2 and "no such manifest" in done.stderr and "Traceback" not in done.stderr


def test_every_manifest_argument_has_help():
    from jobs.manifest import _parser

    subcommands = next(action for action in _parser()._actions if action.dest == "command").choices
    undescribed = [f"{name} {action.dest}" for name, parser in subcommands.items() for action in parser._actions
                   if not action.help]
    assert undescribed == []
