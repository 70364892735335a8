"""jobs.command_line, what every command shares: --storage-options parsed and checked up front in every command
that takes it, --debug anywhere, Ctrl-C and SIGTERM as `interrupted` (exit 130), and a command line parsed and
its model checked before torch or Ray is imported."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import cli
from jobs.command_line import (INTERRUPTED, UsageError, check_storage_options, module_entry,
                               run_command)
from jobs.ray_session import join_ray

REPO = Path(__file__).resolve().parents[1]

COMMAND_LINES = {
    "infer": ["infer", "--manifest", "s3://corpora/m.yaml", "--model", "tiny", "--output", "s3://out/p"],
    "score": ["score", "--predictions", "s3://out/p", "--output", "s3://out/scores"],
    "rescore": ["rescore", "--run", "a=s3://out/p", "--output", "s3://out/comparison"],
    "export": ["export", "--predictions", "s3://out/p", "--format", "srt", "--output", "s3://out/srt"],
    "manifest validate": ["manifest", "validate", "s3://corpora/m.yaml"],
    "manifest build": ["manifest", "build", "--audio-dir", "audio", "--name", "c", "--task", "asr", "--out", "s3://corpora/c"],
    "manifest import-seed": ["manifest", "import-seed", "s3://corpora/seed.json", "--name", "c", "--out", "s3://corpora/c.yaml"],
}
BAD_STORAGE_OPTIONS = {
    "{endpoint": "--storage-options is not JSON",
    "[1]": "--storage-options must be a JSON object, not list",
    '{"client_kwarg": {"endpoint_url": "http://s3"}}':
        "--storage-options: s3:// takes no option 'client_kwarg' (did you mean 'client_kwargs'?)",
}


@pytest.mark.parametrize("command", COMMAND_LINES)
@pytest.mark.parametrize("text", BAD_STORAGE_OPTIONS)
def test_bad_storage_options_are_one_line_and_exit_2_in_every_command(command, text, capsys):
    argv = [*COMMAND_LINES[command], "--storage-options", text]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"nota-batch {argv[0]}: error: {BAD_STORAGE_OPTIONS[text]}") and err.count("\n") == 1


def test_storage_options_pass_where_the_filesystem_takes_them_or_they_cannot_be_checked():
    s3 = {"client_kwargs": {"endpoint_url": "http://s3"}, "profile": "dev", "skip_instance_cache": True, "anon": False}
    check_storage_options(s3, ["s3://corpora/m.yaml", "local/out", None])
    check_storage_options({"anything": 1}, ["local/out", "/abs/out", "http://host/m.yaml"])  # not checkable: pass
    check_storage_options({"global_store": False}, ["memory://x"])
    with pytest.raises(UsageError, match="memory:// takes no option 'client_kwargs'"):
        check_storage_options({"client_kwargs": {}}, ["memory://x"])


def test_debug_is_taken_anywhere_on_the_line(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "missing.yaml")
    assert cli.main(["manifest", "validate", missing, "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("no such manifest; check the path\n")
    from jobs.manifest import main

    monkeypatch.setattr(sys, "argv", ["manifest.py", "--debug", "validate", missing])
    assert module_entry(main) == 2
    assert "Traceback" in capsys.readouterr().err


def test_ctrl_c_and_sigterm_end_a_command_with_one_line_and_exit_130(capsys, monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # join_ray's ray.init: it sets its own handler, as Ray's does
    monkeypatch.setattr(ray, "init", lambda address=None: signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum)))

    def interrupted(argv):
        raise KeyboardInterrupt

    def terminated(argv):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)

    def terminated_after_ray_init(argv):
        join_ray()
        terminated(argv)

    handler = signal.getsignal(signal.SIGTERM)
    assert run_command(interrupted, [], name="score") == INTERRUPTED
    assert capsys.readouterr().err == "nota-batch score: interrupted\n"
    for main in (terminated, terminated_after_ray_init):
        assert run_command(main, [], name="infer") == INTERRUPTED
        assert capsys.readouterr().err == "nota-batch infer: interrupted\n"
    assert signal.getsignal(signal.SIGTERM) is handler  # put back once the command ends
    assert run_command(interrupted, [], name="score", debug=True) == INTERRUPTED
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("nota-batch score: interrupted\n")

    def interrupted_saying_more(argv):
        raise KeyboardInterrupt("interrupted: 3 items kept; run the same command again to resume")

    assert run_command(interrupted_saying_more, [], name="infer") == INTERRUPTED
    assert capsys.readouterr().err == "nota-batch infer: interrupted: 3 items kept; run the same command again to resume\n"


@pytest.mark.parametrize("argv, message", [
    (["--model", "nope"], "no preset or config file 'nope'; presets: "),
    (["--model", "tiny", "--set", "decoding.max_new_tokens=many"],
     "invalid model config (preset tiny): override decoding.max_new_tokens: Input should be a valid integer"),
    (["--model", "tiny", "--set", "decodng.num_beams=2"], "(preset tiny): override decodng: Extra inputs are not permitted"),
])
def test_infer_checks_the_model_before_ray_starts(argv, message, capsys):
    assert cli.main(["infer", "--manifest", "m.yaml", "--output", "out", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_parsing_and_checking_a_command_line_loads_neither_torch_nor_ray():
    """Help, usage errors and a bad model answer at once: every command module imports light, and infer and bench
    check their model before importing the job."""
    modules = [module for module, _ in cli.COMMANDS.values()]
    check = ("import importlib, sys\n"
             f"for module in {modules!r}:\n"
             "    importlib.import_module(module)\n"
             "from jobs import cli\n"
             "assert cli.main(['infer', '--manifest', 'm', '--output', 'o', '--model', 'nope']) == 2\n"
             "assert cli.main(['bench', '--model', 'tiny', '--set', 'decoding.num_beams=many']) == 2\n"
             "heavy = sorted({'torch', 'ray', 'transformers'} & set(sys.modules))\n"
             "assert not heavy, heavy\n")
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
