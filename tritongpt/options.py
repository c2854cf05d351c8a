"""Command-line options built from a dataclass: its defaults, overridden by an optional config file (JSON or TOML),
overridden by flags. `--help` lists the fields by group, each with a placeholder that says what goes there, its
choices and its default; a mistake is one line on stderr and exit 2."""
import argparse
import dataclasses
import json
import math
import os
import signal
import sys
import textwrap
import time
import tomllib
import typing
from pathlib import Path

from tritongpt.errors import UserError


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints the whole usage first; one line is what a user needs
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps each line of a help text by itself, and puts a last line that only gives the default at the end of the
    line before when both fit."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=28)

    def _split_lines(self, text, width):
        lines = text.splitlines()
        if len(lines) > 1 and lines[-1].startswith("(default") and len(lines[-2]) + 3 + len(lines[-1]) <= width:
            lines[-2:] = [f"{lines[-2]}   {lines[-1]}"]
        return [wrapped for line in lines for wrapped in textwrap.wrap(line, width, break_on_hyphens=False) or [""]]


def flag(name: str) -> str:
    """The command-line flag of an option field: learning_rate is --learning-rate."""
    return "--" + name.replace("_", "-")


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def finite_float(text: str) -> float:
    """A float flag value; nan and inf are refused here, so no option check has to think of them."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


finite_float.__name__ = "float"  # argparse names the type in its errors: "invalid float value"


def _bool_values_as_flags(argv: list[str], bool_flags: set[str], takes_inputs: bool) -> list[str]:
    """`--bias false`, `--bias=false` and `--bias true` as argparse's `--no-bias` and `--bias`. A word after a flag
    is taken as its value when it is a boolean word, or any word where the command takes no inputs (so `--bias
    maybe` is refused as --bias's value); where it takes inputs, `--overwrite notes.txt` keeps notes.txt an input."""
    negated_flags = {"--no-" + name[2:] for name in bool_flags}

    def is_value(word: str) -> bool:
        return word.lower() in TRUE_WORDS + FALSE_WORDS or not (takes_inputs or word.startswith("-"))

    out = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in bool_flags | negated_flags and not eq and i + 1 < len(argv) and is_value(argv[i + 1]):
            value, eq = argv[i + 1], "="
            i += 1
        if name in negated_flags and eq:
            raise UserError(f"{name} takes no value, got {value!r}; pass {name} alone, or --{name[5:]} true or false")
        if name in bool_flags and eq:
            out.append(name if _parse_bool_or_exit(name, value) else "--no-" + name[2:])
        else:
            out.append(arg)
        i += 1
    return out


def _parse_bool_or_exit(name: str, value: str) -> bool:
    try:
        return _parse_bool(value)
    except argparse.ArgumentTypeError as e:
        raise UserError(f"{name}: {e}") from None


def _field_type(cls, f: dataclasses.Field):
    """The plain type of a field: int, float, str or bool (X | None gives X, tuple[X, ...] gives X)."""
    hint = typing.get_type_hints(cls)[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def _optional(kind):
    """A flag value parser that also takes "none", for fields whose default is None."""
    def parse(text: str):
        return None if text.lower() == "none" else kind(text)
    parse.__name__ = kind.__name__  # argparse names the type in its errors: "invalid int value"
    return parse


# Placeholders for fields that name none: what a number of that type stands for.
METAVARS = {int: "N", float: "X", str: "TEXT"}


def _shown(default) -> str:
    """A default as it is typed on the command line."""
    if default is None:
        return "none"
    if isinstance(default, bool):
        return str(default).lower()
    return str(default) if default != "" else '""'


def build_parser(cls, description: str, with_config_file: bool = True) -> argparse.ArgumentParser:
    # SUPPRESS keeps flags that were not given out of the parsed namespace, so they do not overwrite a config
    # file's values with defaults; each help text states its default itself.
    # No abbreviations: a shortened flag keeps meaning one option only until another option shares its prefix.
    # The usage line names the positional arguments only: the options follow, grouped, each with its placeholder.
    positional = [f for f in dataclasses.fields(cls) if f.metadata.get("positional")]
    usage = "%(prog)s [OPTIONS]" + "".join(f" [{f.metadata['metavar']} ...]" for f in positional)
    parser = _OneLineParser(description=description, usage=usage, argument_default=argparse.SUPPRESS,
                            allow_abbrev=False, formatter_class=_HelpFormatter)
    group = parser
    if with_config_file:
        parser.add_argument("--config", metavar="FILE", help="a JSON or TOML file of option values; flags given "
                            "here override it\n(default: none)")
    for f in dataclasses.fields(cls):
        if f.metadata.get("group"):  # this field starts a group, and the fields after it belong to it
            group = parser.add_argument_group(f.metadata["group"])
        kind = _field_type(cls, f)
        choices = f.metadata.get("choices")
        metavar = f.metadata.get("metavar") or METAVARS.get(kind)
        help_text = f.metadata.get("help", "").replace("%", "%%")
        if f.metadata.get("positional"):  # its help says what none of it means
            group.add_argument(f.name, nargs="*", metavar=metavar, help=help_text)
            continue
        if choices:
            help_text += "\n" + " | ".join(choices)
        help_text += f"\n(default: {_shown(f.default)})"
        if kind is bool:
            group.add_argument(flag(f.name), action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kind = finite_float if kind is float else kind
            parse = _optional(kind) if type(None) in typing.get_args(typing.get_type_hints(cls)[f.name]) else kind
            group.add_argument(flag(f.name), type=parse, metavar=metavar, choices=choices, help=help_text)
    return parser


def _defaults(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def read_config_file(cls, path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {file} does not exist; give the path of a JSON or TOML file")
    try:
        values = tomllib.loads(file.read_text()) if file.suffix == ".toml" else json.loads(file.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as e:
        raise UserError(f"config file {file} is not valid {'TOML' if file.suffix == '.toml' else 'JSON'}: {e}")
    if not isinstance(values, dict):
        raise UserError(f"config file {file} must hold a table of option names to values")
    known = {f.name: f for f in dataclasses.fields(cls)}
    checked = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in known:
            raise UserError(f"config file {file}: unknown option {key!r}; see --help for the options")
        kind = _field_type(cls, known[name])
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"config file {file}: {key} must be a finite number, got {value!r}")
        ok = (isinstance(value, bool) if kind is bool else
              isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
              isinstance(value, int) and not isinstance(value, bool) if kind is int else isinstance(value, kind))
        if not (ok or value is None):
            raise UserError(f"config file {file}: {key} must be {kind.__name__}, got {value!r}")
        choices = known[name].metadata.get("choices")
        if choices and value not in choices:
            raise UserError(f"config file {file}: {key} must be one of {', '.join(choices)}, got {value!r}")
        checked[name] = float(value) if kind is float and value is not None else value
    return checked


def parse_options(cls, description: str, argv: list[str] | None = None, with_config_file: bool = True):
    """(options, the names given explicitly in the config file or on the command line)."""
    parser = build_parser(cls, description, with_config_file)
    bool_flags = {flag(f.name) for f in dataclasses.fields(cls) if _field_type(cls, f) is bool}
    takes_inputs = any(f.metadata.get("positional") for f in dataclasses.fields(cls))
    argv = sys.argv[1:] if argv is None else argv
    args = vars(parser.parse_args(_bool_values_as_flags(argv, bool_flags, takes_inputs)))
    for f in dataclasses.fields(cls):
        if f.metadata.get("positional") and f.name in args:
            args[f.name] = tuple(args[f.name])
    values = read_config_file(cls, args.pop("config")) if args.get("config") else {}
    args.pop("config", None)
    values.update(args)
    return cls(**{**_defaults(cls), **values}), set(values)


def option(default, help: str, choices: tuple | None = None, positional: bool = False, metavar: str | None = None,
           group: str | None = None):
    """A dataclass field with its --help text, allowed values and placeholder (metavar: what goes there, e.g. DIR).
    A field with a group starts that group in --help; the fields after it belong to it until the next group. A
    positional field is a tuple of strings taken from the arguments that are no flags."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "positional": positional,
                                                        "metavar": metavar, "group": group})


def run_main(main) -> None:
    """Run a script's main(), turning a UserError into one line on stderr and exit status 2."""
    try:
        main()
    except UserError as e:
        rank = int(os.environ.get("RANK", "0"))
        if rank != 0:
            _leave_the_report_to_rank_0()
        print(f"error: {e}" if rank == 0 else f"error (rank {rank}): {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


RANK_0_REPORT_WAIT_S = 20


def _leave_the_report_to_rank_0() -> None:
    """Under torchrun every rank meets a mistake alike, and one line from rank 0 is all a user needs. Once rank 0
    has printed it and exited, torchrun stops the other ranks with SIGTERM: this rank exits 2 on it, as rank 0 did.
    A mistake that only this rank meets (its GPU, its disk) is printed here, after the wait."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(2))
    time.sleep(RANK_0_REPORT_WAIT_S)
