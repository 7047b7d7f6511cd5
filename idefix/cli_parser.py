"""argparse, made to answer a mistake in one line: what was wrong and the nearest valid choice, exit code 2.

Also the value parsers the `idefix` flags share (positive integers, `--token-source`).
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from pathlib import Path
from typing import NoReturn

from idefix.errors import ModelLoadError

_INVALID_CHOICE = re.compile(r"argument (?P<arg>\S+): invalid choice: '(?P<value>.*)' \(choose from (?P<choices>.*)\)")
_INVALID_TYPE = re.compile(r"argument (?P<arg>\S+): invalid (?P<kind>int|float) value: '(?P<value>.*)'")
_UNKNOWN = re.compile(r"unrecognized arguments: (?P<args>.*)")
_REQUIRED = re.compile(r"the following arguments are required: (?P<args>.*)")
TOKEN_SOURCES = ("env:VAR", "literal:TOKEN", "path:FILE", "cache", "none")


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage block) with a did-you-mean hint.
    Abbreviated flags are off: `--max` must not silently mean `--max-seqs`."""

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def,override]
        self.argv = list(sys.argv[1:] if args is None else args)  # for messages about misplaced flags
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {self.explain(message)}\n")

    def explain(self, message: str) -> str:
        """argparse's message rewritten to name the problem and the nearest valid choice."""
        if m := _INVALID_CHOICE.fullmatch(message):
            choices = [c.strip().strip("'") for c in m["choices"].split(",")]
            if m["arg"] == "COMMAND":
                return self._bad_command(m["value"], choices)
            hint = nearest(m["value"], choices)
            return f"{_flag(m['arg'])}: unknown value {m['value']!r}{hint} (choose from {', '.join(choices)})"
        if m := _INVALID_TYPE.fullmatch(message):
            kind = "an integer" if m["kind"] == "int" else "a number"
            return f"{_flag(m['arg'])}: needs {kind}, got {m['value']!r}"
        if m := _UNKNOWN.fullmatch(message):
            unknown = next((a for a in m["args"].split() if a.startswith("-")), m["args"].split()[0])
            if not unknown.startswith("-"):
                return f"unexpected argument {unknown!r} (quote a question with spaces; see {self.prog} --help)"
            return self._bad_flag(unknown.split("=")[0])
        if m := _REQUIRED.fullmatch(message):
            return f"missing {m['args']} (see {self.prog} --help)"
        if message.startswith("argument "):
            arg, _, rest = message.removeprefix("argument ").partition(": ")
            return f"{_flag(arg)}: {rest}"
        return f"{message} (see {self.prog} --help)"

    def _bad_command(self, value: str, commands: list[str]) -> str:
        argv = getattr(self, "argv", [])
        before = argv[argv.index(value) - 1] if value in argv[1:] else ""
        if before.startswith("-") and before not in self.all_flags(local=True):
            return self._bad_flag(before)  # `idefix --max-seq-len 8 chat`: argparse took 8 for the command
        return f"unknown command {value!r}{nearest(value, commands)} (choose from {', '.join(commands)})"

    def _bad_flag(self, flag: str) -> str:
        if flag in self.all_flags():
            return f"{flag} belongs after the command (idefix COMMAND {flag} ...; see idefix COMMAND --help)"
        names = {f.lstrip("-"): f for f in self.all_flags() if f.startswith("--")}  # `--` would make all look alike
        close = difflib.get_close_matches(flag.lstrip("-"), list(names), n=1, cutoff=0.6)
        hint = f"; did you mean {names[close[0]]}?" if close else ""
        return f"unknown flag {flag}{hint} (see {self.prog} --help)"

    def all_flags(self, local: bool = False) -> list[str]:
        """Every option string of this parser and (unless `local`) of its subcommands."""
        flags: list[str] = []
        for action in self._actions:
            flags += action.option_strings
            if isinstance(action, argparse._SubParsersAction) and not local:
                for sub in action.choices.values():
                    flags += sub.all_flags() if isinstance(sub, Parser) else []
        return sorted(set(flags))


def _flag(arg: str) -> str:
    """`-m/--model-id` -> `--model-id` (the long form reads best in a message)."""
    return arg.split("/")[-1]


def nearest(word: str, choices: list[str]) -> str:
    """`; did you mean X?` for the closest choice, or '' when none is close."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f"; did you mean {close[0]}?" if close else ""


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"needs an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def isq_type(text: str) -> str:
    """Check an `--isq` value against the GGML types (`idefix.quant.ggml.parse_isq`); keep the user's spelling."""
    from idefix.errors import InvalidRequestError
    from idefix.quant.ggml import parse_isq

    try:
        parse_isq(text)
    except InvalidRequestError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def token_source(text: str) -> str:
    """Check the mistral.rs `--token-source` syntax; the token itself is read by `read_token` at load time."""
    scheme, sep, rest = text.partition(":")
    if (text in ("cache", "none")) or (sep and rest and scheme in ("env", "literal", "path")):
        return text
    hint = nearest(scheme, ["env", "literal", "path", "cache", "none"]).replace(";", "", 1).strip()
    raise argparse.ArgumentTypeError(
        f"{text!r} is not a token source{(' (' + hint + ')') if hint else ''}; use {', '.join(TOKEN_SOURCES)}"
    )


def read_token(source: str | None) -> str | bool | None:
    """The hub token a `--token-source` names: a string, False for `none` (send no token), None for `cache`
    (huggingface_hub's own: HF_TOKEN or the cached login). Raises ModelLoadError with one line."""
    if source is None or source == "cache":
        return None
    if source == "none":
        return False
    scheme, _, rest = source.partition(":")
    if scheme == "literal":
        return rest
    if scheme == "env":
        value = os.environ.get(rest)
        if not value:
            raise ModelLoadError(f"--token-source env:{rest}: the environment variable {rest} is not set")
        return value
    try:
        return Path(rest).expanduser().read_text().strip()
    except OSError as exc:
        raise ModelLoadError(f"--token-source path:{rest}: cannot read the token file ({exc.strerror})") from None
