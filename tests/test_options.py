"""Command-line options from a dataclass: how a word after a boolean flag is read."""
from dataclasses import dataclass

import pytest

from tritongpt.errors import UserError
from tritongpt.options import option, parse_options


@dataclass(frozen=True)
class WithInputs:
    inputs: tuple[str, ...] = option((), "files to read", positional=True)
    overwrite: bool = option(False, "replace what is there")


@dataclass(frozen=True)
class WithoutInputs:
    overwrite: bool = option(False, "replace what is there")


def test_a_word_after_a_boolean_flag_is_an_input_unless_it_is_a_boolean_word():
    opts, _ = parse_options(WithInputs, "", ["--overwrite", "notes.txt"])
    assert opts.overwrite and opts.inputs == ("notes.txt",)
    opts, _ = parse_options(WithInputs, "", ["--overwrite", "no", "notes.txt"])
    assert not opts.overwrite and opts.inputs == ("notes.txt",)


def test_without_inputs_a_word_after_a_boolean_flag_is_its_value():
    assert parse_options(WithoutInputs, "", ["--overwrite", "on"])[0].overwrite
    with pytest.raises(UserError, match="^--overwrite: expected true or false, got 'notes.txt'$"):
        parse_options(WithoutInputs, "", ["--overwrite", "notes.txt"])
    with pytest.raises(UserError, match="^--no-overwrite takes no value, got 'notes.txt'"):
        parse_options(WithoutInputs, "", ["--no-overwrite", "notes.txt"])
