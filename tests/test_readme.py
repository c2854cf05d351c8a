"""The README documents every option of the three scripts, and CI runs the README's test command."""
import io
import re
from contextlib import redirect_stdout, suppress
from pathlib import Path

import pytest

import sample
import train
from tritongpt.data import prepare

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()


def help_flags(main) -> set[str]:
    out = io.StringIO()
    with redirect_stdout(out), suppress(SystemExit):  # (torchrun's @record on train.main returns on exit 0)
        main(["--help"])
    flags = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.getvalue())) - {"--help"}
    return {f for f in flags if not (f.startswith("--no-") and "--" + f[5:] in flags)}


@pytest.mark.parametrize("main", [train.main, sample.main, prepare.main], ids=["train", "sample", "prepare"])
def test_readme_documents_every_option(main):
    flags = help_flags(main)
    assert len(flags) > 4
    missing = sorted(f for f in flags if f"`{f}" not in README)
    assert not missing, f"README.md does not document {missing}"


def test_ci_runs_the_readme_test_command():
    command = 'pip install -e ".[test]" && python -m pytest'
    assert command in README
    assert command in (REPO / ".ci" / "run").read_text()
