"""Command lines from typed dataclasses: every program's flags, defaults, help and choices defined once.

Each program has a config dataclass whose fields are declared with ``option(...)``; ``parse`` builds the
argparse parser from the fields and returns the filled-in dataclass, whose ``__post_init__`` validates it.
Field ``foo_bar`` is the flag ``--foo-bar`` (or a positional argument), its type annotation gives the
argument type (``int``, ``float``, ``str``, ``Path``, ``bool``, ``list[str]``, optionally ``| None``), and
the same spelling is used in checkpoints and logs.
"""

from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, field, fields
from typing import Any, TypeVar

C = TypeVar("C")


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    default_factory: Callable[[], Any] | None = None,
    choices: Sequence[str] | None = None,
    positional: bool = False,
    short: str | None = None,
    aliases: Sequence[str] = (),
    metavar: str | None = None,
    group: str | None = None,
    bare: Any = None,
    cli: bool = True,
    convert: Callable[[str], Any] | None = None,
) -> Any:
    """A config field that is also a command-line argument.

    ``aliases`` are deprecated spellings that still work and print a note saying the new one; ``group``
    puts the flag under a heading in ``--help``; ``bare`` is the value of the flag given without one (its
    argument becomes optional); ``cli=False`` keeps a field off the command line; ``convert`` reads the
    argument instead of the annotation's type (a value such as ``auto`` beside numbers).
    """
    metadata = dict(help=help, choices=choices, positional=positional, short=short, aliases=tuple(aliases),
                    metavar=metavar, group=group, bare=bare, cli=cli, convert=convert)  # fmt: skip
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def flag(name: str) -> str:
    """The command-line spelling of a config field: ``seq_len`` -> ``--seq-len``."""
    return "--" + name.replace("_", "-")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Docstring descriptions as written, and every default that says something shown."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default in (None, False, [], argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the programs."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class _Deprecated(argparse.Action):
    """A renamed flag's old spelling: it still works, with a note naming the new one."""

    def __init__(self, option_strings: list[str], dest: str, *, new: str, **kwargs: Any) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        print(f"note: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def build_parser(cls: type, *, prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one argument per command-line field of the dataclass ``cls``."""
    parser = _Parser(prog=prog, description=description, formatter_class=_HelpFormatter)
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(cls):
        meta = f.metadata
        if not meta.get("cli", False):
            continue
        target = parser
        if meta["group"]:
            target = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        _add_argument(target, f, hints[f.name])
    return parser


def _add_argument(parser: argparse._ActionsContainer, f: Field, hint: Any) -> None:
    meta = f.metadata
    optional = type(None) in typing.get_args(hint)
    base = next(t for t in typing.get_args(hint) if t is not type(None)) if optional else hint  # X | None -> X
    kwargs: dict[str, Any] = {"help": meta["help"]}
    if f.default is not MISSING:
        kwargs["default"] = f.default
    elif f.default_factory is not MISSING:  # type: ignore[misc]
        kwargs["default"] = f.default_factory()  # type: ignore[misc]
    if meta["positional"]:
        kwargs.pop("default", None)
        if f.default is not MISSING:
            kwargs.update(nargs="?", default=f.default)
        parser.add_argument(f.name, type=base, metavar=meta["metavar"] or f.name.upper(), **kwargs)
        return
    names = [flag(f.name)] + ([meta["short"]] if meta["short"] else [])
    if base is bool:
        action = argparse.BooleanOptionalAction if optional or f.default is True else "store_true"
        kwargs["action"] = action
    else:
        if typing.get_origin(base) is list:
            base, kwargs["nargs"] = typing.get_args(base)[0], "+"
        kwargs["type"] = meta["convert"] or base
        kwargs["metavar"] = meta["metavar"] or f.name.upper()
        if meta["bare"] is not None:
            kwargs.update(nargs="?", const=meta["bare"])
        if meta["choices"]:
            kwargs["choices"] = list(meta["choices"])
            del kwargs["metavar"]
    parser.add_argument(*names, dest=f.name, **kwargs)
    for alias in meta["aliases"]:
        takes = {"nargs": 0, "const": True} if "action" in kwargs else {
            k: v for k, v in kwargs.items() if k in ("type", "nargs", "metavar", "choices")}  # fmt: skip
        parser.add_argument(alias, dest=f.name, action=_Deprecated, new=names[0], default=argparse.SUPPRESS,
                            help=f"deprecated spelling of {names[0]}", **takes)  # fmt: skip


def parse(cls: type[C], argv: Sequence[str] | None = None, *, prog: str, description: str | None = None) -> C:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into a ``cls`` instance; its ``__post_init__`` validates."""
    args = build_parser(cls, prog=prog, description=description).parse_args(argv)
    return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.metadata.get("cli", False)})
