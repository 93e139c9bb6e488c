"""README and docs/ against the code: every config key they name exists, every flag they give a
command is one of its flags, every command exists, and every local link points at a file."""

from __future__ import annotations

import re

import pytest
from helpers import ROOT

from cxr_ray.cli import build_parser
from cxr_ray.config import SECTIONS, valid_keys

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# a key in backticks (`train.epochs`, `train.epochs=5`) or after --set, not a file (`tune.py`)
KEY = re.compile(r"(?:`|--set )(" + "|".join(SECTIONS) + r")\.([a-z_]+)(?=[`=*\s])")
FILES = ("py", "md", "pt", "pkl", "json", "onnx", "torchscript", "yaml", "parquet")
COMMAND = re.compile(r"cxr-ray ([a-z-]+)((?: +[^`|\n]*?)?)(?=`|\n|\||$)")


def _commands() -> dict[str, set[str]]:
    parser = build_parser()
    sub = parser._subparsers._group_actions[0].choices
    return {name: {o for a in p._actions for o in a.option_strings} for name, p in sub.items()}


def unknown_keys(text: str) -> list[str]:
    """Config keys named in ``text`` that ``config.py`` does not have."""
    keys = set(valid_keys())
    named = {f"{m.group(1)}.{m.group(2)}" for m in KEY.finditer(text) if m.group(2) not in FILES}
    return sorted(k for k in named if k not in keys)


def unknown_commands_and_flags(text: str) -> list[str]:
    """``cxr-ray CMD --flag`` uses in ``text`` whose command or flag the parser does not have."""
    commands = _commands()
    problems = []
    for m in COMMAND.finditer(text):
        name, rest = m.group(1), m.group(2)
        if name in ("COMMAND", "CMD"):
            continue
        if name not in commands:
            if name.startswith("-"):  # cxr-ray --version
                continue
            problems.append(f"unknown command: cxr-ray {name}")
            continue
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest):
            if flag not in commands[name] and flag != "--help":
                problems.append(f"cxr-ray {name}: no flag {flag}")
    return sorted(set(problems))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_config_keys_named_in_the_docs_exist(doc):
    assert unknown_keys(doc.read_text()) == [], doc.name


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_commands_and_flags_in_the_docs_exist(doc):
    assert unknown_commands_and_flags(doc.read_text()) == [], doc.name


def test_the_checks_catch_a_wrong_key_flag_or_command():
    text = "Set `train.epochz=5`, run `cxr-ray score --checkpoint C --outt D` and `cxr-ray trian --data R`."
    assert unknown_keys(text) == ["train.epochz"]
    assert unknown_commands_and_flags(text) == ["cxr-ray score: no flag --outt", "unknown command: cxr-ray trian"]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_local_links_point_at_files(doc):
    missing = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
        if "://" in target or target.startswith("mailto:"):
            continue
        if not (doc.parent / target).exists():
            missing.append(target)
    assert missing == [], f"{doc.name} links to missing files: {missing}"


def test_readme_is_a_manual_not_a_log():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    for phrase in ("before this release", "previous release", "earlier demo runs"):
        assert phrase not in text.lower(), phrase
