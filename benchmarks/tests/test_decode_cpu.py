"""benchmarks.decode_cpu runs both decodes and reports each one's CPU per item."""

import re

from benchmarks.decode_cpu import main


def test_it_reports_the_model_runs_and_the_dry_runs_cpu_per_item(capsys):
    main(["--items", "3", "--seconds", "0.2"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["model run", "dry run"]
    assert all(re.fullmatch(r"[a-z ]+: \d+\.\d{3} ms CPU per item \(0\.2 s clip, tiny\)", line) for line in lines)
