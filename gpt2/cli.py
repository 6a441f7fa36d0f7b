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
        if "(default" in text or any(action.default is nothing for nothing in (None, False, argparse.SUPPRESS)):
            return text
        return text + " (default: %(default)s)"


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the programs."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class _Deprecated(argparse.Action):
    """A renamed flag's old spelling: it still works, with a note naming the new one."""

    def __init__(self, option_strings: list[str], dest: str, *, new: str | None, **kwargs: Any) -> None:
        self.new = new  # None: no note (a parser that only looks at what was given)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001
        if self.new is not None:
            print(f"note: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, self.const if self.nargs == 0 else values)


def build_parser(
    cls: type, *, prog: str, description: str | None = None, defaults: object | None = None, given_only: bool = False
) -> argparse.ArgumentParser:
    """An argparse parser with one argument per command-line field of the dataclass ``cls``.

    ``defaults``: an instance of ``cls`` whose values are the defaults (else the fields' own). ``given_only``: a
    quiet parser that returns only the flags given (no defaults, no ``--help``, no deprecation notes).
    """
    parser = _Parser(prog=prog, description=description, formatter_class=_HelpFormatter, add_help=not given_only,
                     argument_default=argparse.SUPPRESS if given_only else None)  # fmt: skip
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(cls):
        meta = f.metadata
        if not meta.get("cli", False):
            continue
        target = parser
        if meta["group"]:
            target = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        default = getattr(defaults, f.name) if defaults is not None else _own_default(f)
        _add_argument(target, f, hints[f.name], argparse.SUPPRESS if given_only else default, notes=not given_only)
    return parser


def _own_default(f: Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return MISSING


def _add_argument(parser: argparse._ActionsContainer, f: Field, hint: Any, default: Any, notes: bool) -> None:
    meta = f.metadata
    optional = type(None) in typing.get_args(hint)
    base = next(t for t in typing.get_args(hint) if t is not type(None)) if optional else hint  # X | None -> X
    kwargs: dict[str, Any] = {"help": meta["help"]}
    if default is not MISSING:
        kwargs["default"] = default
    if meta["positional"]:
        kwargs.pop("default", None)
        if f.default is not MISSING:
            kwargs.update(nargs="?", default=default)
        parser.add_argument(f.name, type=base, metavar=meta["metavar"] or f.name.upper(), **kwargs)
        return
    names = [flag(f.name)] + ([meta["short"]] if meta["short"] else [])
    if base is bool:
        # --x/--no-x where the default may be either (a recipe's, or None for "decided later")
        action = argparse.BooleanOptionalAction if optional or f.default is not False else "store_true"
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
        parser.add_argument(alias, dest=f.name, action=_Deprecated, new=names[0] if notes else None,
                            default=argparse.SUPPRESS, help=f"deprecated spelling of {names[0]}", **takes)  # fmt: skip


def parse(
    cls: type[C],
    argv: Sequence[str] | None = None,
    *,
    prog: str,
    description: str | None = None,
    factory: Callable[..., C] | None = None,
) -> C:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into a ``cls`` instance; its ``__post_init__`` validates.

    With a ``factory`` (``gpt2.config.train_config``), the instance is ``factory(**flags given)``: the factory
    supplies every value not given, and ``--help`` shows the defaults it gives for the flags on the command line
    (``train.py --recipe modern --help`` shows the modern recipe's).
    """
    if factory is None:
        args = build_parser(cls, prog=prog, description=description).parse_args(argv)
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if f.metadata.get("cli", False)})
    given, _ = build_parser(cls, prog=prog, given_only=True).parse_known_args(argv)
    config = factory(**vars(given))
    build_parser(cls, prog=prog, description=description, defaults=config).parse_args(argv)  # --help, unknown flags
    return config
