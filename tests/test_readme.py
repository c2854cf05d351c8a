"""The README documents every option of the scripts as their --help groups them, and CI runs the README's test
command; --help shows each option's placeholder, choices and default."""
import dataclasses
import io
import re
from contextlib import redirect_stdout, suppress
from pathlib import Path

import pytest

import sample
import train
from tritongpt import export, plot
from tritongpt.data import prepare
from tritongpt.train_options import TrainOptions

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def help_text(main) -> str:
    out = io.StringIO()
    with redirect_stdout(out), suppress(SystemExit):  # (torchrun's @record on train.main returns on exit 0)
        main(["--help"])
    return out.getvalue()


def help_flags(main) -> set[str]:
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text(main))) - {"--help"}
    return {f for f in flags if not (f.startswith("--no-") and "--" + f[5:] in flags)}


@pytest.mark.parametrize("main", [train.main, sample.main, prepare.main, plot.main, export.main],
                         ids=["train", "sample", "prepare", "plot", "export"])
def test_readme_documents_every_option(main):
    flags = help_flags(main)
    assert flags
    missing = sorted(f for f in flags if f"`{f}" not in README)
    assert not missing, f"README.md does not document {missing}"


def test_ci_runs_the_readme_test_command():
    command = 'pip install -e ".[test]" && python -m pytest'
    assert command in README
    assert command in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("main, options", [(train.main, TrainOptions), (sample.main, sample.SampleOptions),
                                           (prepare.main, prepare.PrepareOptions),
                                           (export.main, export.ExportOptions)],
                         ids=["train", "sample", "prepare", "export"])
def test_help_shows_groups_placeholders_choices_and_defaults(main, options):
    text = help_text(main)
    assert not re.search(r"\b(STR|INT|FLOAT)\b", text), "placeholders say what goes there"
    for f in dataclasses.fields(options):
        if f.metadata["positional"]:
            continue
        flag = "--" + f.name.replace("_", "-")
        # The option's lines: its flag's, and the indented ones under it.
        block = re.search(rf"^  {flag}(?![\w-]).*\n(?:   .*\n)*", text, re.M)
        assert block, f"{flag} missing from --help"
        block = block.group(0)
        assert "(default: " in block, flag
        for choice in f.metadata["choices"] or ():
            assert re.search(rf"(?<![\w-]){re.escape(choice)}(?![\w-])", block), f"{flag} does not list {choice}"
    groups = [f.metadata["group"] for f in dataclasses.fields(options) if f.metadata["group"]]
    headings = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert [h for h in headings if h in groups] == groups


def test_readme_groups_train_options_as_help_does():
    groups = [f.metadata["group"] for f in dataclasses.fields(TrainOptions) if f.metadata["group"]]
    assert len(groups) == 6
    positions = [README.find(f"| **{group}** |") for group in groups]
    assert -1 not in positions and positions == sorted(positions), groups


@pytest.mark.parametrize("main, heading", [(train.main, "### `train.py`"), (sample.main, "### `sample.py`"),
                                           (prepare.main, "### `data/prepare.py"),
                                           (export.main, "### `python -m tritongpt.export")],
                         ids=["train", "sample", "prepare", "export"])
def test_readme_tables_give_the_defaults_help_gives(main, heading):
    """Each option's row in the script's table in the README shows the default --help shows (a default of none may
    be spelled out in words: what none means)."""
    table = README[README.index(heading):]
    table = table[:table.index("\n#", 1)]
    rows = 0
    for match in re.finditer(r"^  (--[a-z][a-z0-9-]*).*\n(?:   .*\n)*", help_text(main), re.M):
        default = re.search(r"\(default: (.*)\)$", " ".join(match.group(0).split())).group(1)
        for row in re.findall(rf"^\| `{re.escape(match.group(1))}` \| ([^|]*) \|", table, re.M):
            rows += 1
            if default != "none":
                assert row.strip().replace("`", "").lower() == default.lower(), match.group(1)
    assert rows
