"""The READMEs' tables that mirror code say what the code does: the batch job's options (RunOptions), the output
columns (OUTPUT_SCHEMA), the commands (jobs.cli.COMMANDS), the modules of the layout table, the manifest fields
(Manifest) and the work-item columns (WORK_ITEM_SCHEMA). A field added, renamed or dropped in one place and not the other fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pytest

from jobs.cli import COMMANDS
from jobs.corpus.items import WORK_ITEM_SCHEMA
from jobs.corpus.manifest_schema import Manifest
from jobs.inference.options import RunOptions
from jobs.predictions import OUTPUT_SCHEMA

REPO = Path(__file__).resolve().parents[1]
FLAG_OF_FIELD = {"overrides": "--set KEY=VALUE"}  # every other RunOptions field is --its-name-with-dashes


def section(readme: str, heading: str) -> str:
    """The text under `heading` (a whole heading line) up to the next heading of any level."""
    text = (REPO / readme).read_text()
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    following = re.search(r"^#+ ", text[start:], re.MULTILINE)
    return text[start:start + following.start()] if following else text[start:]


def table(text: str, header: str) -> list[list[str]]:
    """The rows (cells, stripped) of the first Markdown table in `text` whose header row is `header`."""
    lines = text[text.index(header):].splitlines()[2:]
    rows = lines[:next((n for n, line in enumerate(lines) if not line.startswith("|")), len(lines))]
    return [[cell.strip() for cell in re.split(r"(?<!\\)\|", row.strip("|"))] for row in rows]


def quoted(cell: str) -> list[str]:
    """The `names` of a cell, in order."""
    return re.findall(r"`([^`]+)`", cell)


def top_level(types: str) -> list[str]:
    """A cell's comma-separated types, commas inside <...> kept: `list<struct<a int32, b int32>>, int32`."""
    parts, depth, current = [], 0, ""
    for char in types:
        depth += {"<": 1, ">": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    return [*parts, current.strip()]


def readme_type(kind: pa.DataType) -> str:
    """An Arrow type as the READMEs write it: `float64`, `list<string>`, `struct<start float64, ...>`, `timestamp`."""
    if pa.types.is_list(kind):
        return f"list<{readme_type(kind.value_type)}>"
    if pa.types.is_struct(kind):
        return "struct<" + ", ".join(f"{field.name} {readme_type(field.type)}" for field in kind) + ">"
    if pa.types.is_timestamp(kind):
        return "timestamp"
    return {"double": "float64"}.get(str(kind), str(kind))


def column_types(rows: list[list[str]]) -> dict[str, str]:
    """Each column's type from a `| column | type | meaning |` table: one type a name, or one type for all names."""
    types = {}
    for cells in rows:
        names, kinds = quoted(cells[0]), top_level(cells[1])
        assert len(kinds) in (1, len(names)), cells
        types |= {name: kinds[0] if len(kinds) == 1 else kind for name, kind in zip(names, kinds * len(names))}
    return types


def stated_default(value: object) -> str:
    """A default as the options table states it: `off` for False, `none` for an empty mapping, 1 for 1.0."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (int, float)):
        return f"{value:g}"
    return "none" if value == {} else str(value)


def test_the_infer_options_table_has_a_row_per_run_option_with_its_default():
    rows = {cells[0].replace("`", ""): cells[1] for cells in table(section("README.md", "## Run the batch job"),
                                                                       "| flag | default | meaning |")}
    flags = {FLAG_OF_FIELD.get(name, f"--{name.replace('_', '-')}"): field for name, field in RunOptions.model_fields.items()}
    assert sorted(rows) == sorted(flags), "README's options table and RunOptions differ"
    for flag, field in flags.items():
        if field.is_required():
            assert rows[flag] == "required", flag
        elif (default := field.get_default(call_default_factory=True)) is not None:
            assert rows[flag].replace("`", "").split()[0] == stated_default(default), flag


def test_the_output_columns_table_is_the_output_schema():
    rows = table(section("README.md", "## Outputs"), "| column | type | meaning |")
    assert column_types(rows) == {field.name: readme_type(field.type) for field in OUTPUT_SCHEMA}


def test_the_commands_named_in_the_readme_are_the_cli_registry():
    text = section("README.md", "## Commands and exit codes")
    listed = text[text.index("are the same commands:"):text.index("`nota-batch --version`")]
    assert sorted(set(quoted(listed))) == sorted(COMMANDS)
    layout = next(cells for cells in table(section("README.md", "## Layout"), "| path | what |") if cells[0] == "`jobs/`")
    assert {module for module, _ in COMMANDS.values()} <= set(quoted(layout[1]))


def test_the_modules_the_layout_table_names_exist():
    """Each package row's plain `names` are modules of that package (renamed modules leave no stale names)."""
    for cells in table(section("README.md", "## Layout"), "| path | what |"):
        package = REPO / cells[0].strip("`")
        if (package / "__init__.py").exists():
            named = {name for name in quoted(cells[1]) if re.fullmatch(r"[a-z_]+", name)}
            assert named <= {path.stem for path in package.glob("*.py")}, cells[0]


@pytest.mark.parametrize("heading, header, names", [
    ("## Schema", "| field | type | default | meaning |", list(Manifest.model_fields)),
    ("## Work items", "| column | type | meaning |", WORK_ITEM_SCHEMA.names),
])
def test_the_manifest_tables_name_the_fields_of_the_code(heading, header, names):
    rows = table(section("manifests/README.md", heading), header)
    assert sorted(name for cells in rows for name in quoted(cells[0])) == sorted(names)


def test_the_work_item_columns_have_the_schemas_types():
    rows = table(section("manifests/README.md", "## Work items"), "| column | type | meaning |")
    nullable = {cells[0]: cells[1].split(",")[0].strip() for cells in rows}
    assert column_types([[name, kind] for name, kind in nullable.items()]) == {
        field.name: readme_type(field.type) for field in WORK_ITEM_SCHEMA}
