"""From flags and RNNSTREAM_* variables to checked values: the rules a setting declares, the
parsing of its text, and the one-line refusal that names it."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, TypeVar

__all__ = [
    "ENV_PREFIX",
    "Rule",
    "SettingError",
    "check_value",
    "env_name",
    "flag_name",
    "parse_text",
    "read_settings",
    "refusal",
    "settings_parser",
    "show_default",
]

T = TypeVar("T")

ENV_PREFIX = "RNNSTREAM_"
# Variables of the `rnnstream` command that share the prefix (client/_connection.py): the
# server's container sets them for its health check.
CLIENT_VARIABLES = frozenset({"RNNSTREAM_TOKEN", "RNNSTREAM_TLS_CA", "RNNSTREAM_TLS_SERVER_NAME"})
_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off")


@dataclass(frozen=True)
class Rule:
    """What a setting accepts beyond its type."""

    minimum: float | None = None
    above: float | None = None  # exclusive lower bound
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    path: Literal["", "file", "dir"] = ""  # must exist (checked for values given, not defaults)
    prefixes: tuple[str, ...] = ()  # a non-empty value must start with one of these
    upper: bool = False  # the text is taken in upper case (log levels)
    unless: str = ""  # a boolean setting that, when on, makes this one unused (no path check)
    hint: str = ""  # added to a refusal of this setting's value


class SettingError(ValueError):
    """A setting refused; the message is one line naming the setting by its flag and variable."""


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _kind(field: dataclasses.Field[Any]) -> str:
    kind = str(field.type)
    return "tuple" if kind.startswith("tuple") else kind


def parse_text(field: dataclasses.Field[Any], text: str) -> Any:
    """The value of `text` for the field's type; ValueError says what it is not."""
    kind = _kind(field)
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
    if kind == "float":
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"{text!r} is not a finite number")
        return value
    if kind == "bool":
        lowered = text.strip().lower()
        if lowered in _TRUE or lowered in _FALSE:
            return lowered in _TRUE
        raise ValueError(f"{text!r} is not a boolean: use true or false (or 1/0, yes/no, on/off)")
    if kind == "Path":
        return Path(text)
    if kind == "tuple":
        return tuple(part.strip() for part in text.split(",") if part.strip())
    rule: Rule = field.metadata.get("rule", Rule())
    return text.upper() if rule.upper else text


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def check_value(field: dataclasses.Field[Any], value: Any, *, paths: bool = True) -> None:
    """Raise ValueError saying what is wrong with `value` for the field's rule."""
    rule: Rule = field.metadata.get("rule", Rule())
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{value!r} is not a finite number")
    shown = _number(value) if isinstance(value, float) else repr(value)
    if rule.minimum is not None and value < rule.minimum:
        raise ValueError(f"{shown} must be at least {_number(rule.minimum)}")
    if rule.above is not None and value <= rule.above:
        raise ValueError(f"{shown} must be more than {_number(rule.above)}")
    if rule.maximum is not None and value > rule.maximum:
        raise ValueError(f"{shown} must be at most {_number(rule.maximum)}")
    if rule.choices and value not in rule.choices:
        raise ValueError(f"{value!r} is not one of {', '.join(rule.choices)}")
    if rule.prefixes and value and not str(value).startswith(rule.prefixes):
        raise ValueError(f"{value!r} must start with {' or '.join(rule.prefixes)}")
    if paths and rule.path and value:
        path = Path(value)
        if not path.exists():
            raise ValueError(f"{str(value)!r} does not exist")
        if rule.path == "dir" and not path.is_dir():
            raise ValueError(f"{str(value)!r} is not a folder")
        if rule.path == "file" and not path.is_file():
            raise ValueError(f"{str(value)!r} is not a file")


def refusal(field: dataclasses.Field[Any], source: str, problem: str) -> SettingError:
    """`source` is "flag", "env" or "" (set in code): the name it came by leads."""
    flag, env = flag_name(field.name), env_name(field.name)
    named = f"{env} ({flag})" if source == "env" else f"{flag} ({env})"
    hint = field.metadata.get("rule", Rule()).hint
    return SettingError(f"{named}: {problem}{'; ' + hint if hint else ''}")


def describe(rule: Rule) -> str:
    """The rule's range in words, for --help ("" when it has none)."""
    low = (
        f"at least {_number(rule.minimum)}"
        if rule.minimum is not None
        else f"more than {_number(rule.above)}"
        if rule.above is not None
        else ""
    )
    if rule.maximum is None:
        return low
    if rule.minimum is not None:
        return f"{_number(rule.minimum)} to {_number(rule.maximum)}"
    return f"{low + ', ' if low else ''}at most {_number(rule.maximum)}"


def show_default(field: dataclasses.Field[Any]) -> str:
    """The default as a user would type it."""
    value = field.default
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(value) if value else "none"
    if isinstance(value, float):
        return _number(value)
    if value == "":
        return "none"
    return str(value)


def from_env(field: dataclasses.Field[Any], env: Mapping[str, str]) -> tuple[bool, Any]:
    """(True, value) when the field's variable is set (checked but for paths), else (False,
    None)."""
    name = env_name(field.name)
    if name not in env:
        return False, None
    try:
        value = parse_text(field, env[name])
        check_value(field, value, paths=False)
    except ValueError as exc:
        raise refusal(field, "env", str(exc)) from None
    return True, value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line, not argparse's usage block."""
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def settings_parser(cls: type[Any], prog: str, description: str) -> argparse.ArgumentParser:
    """A flag per field of the settings dataclass `cls`, every default left to read_settings
    (so it can tell a flag from a variable from a default)."""
    parser = _Parser(prog=prog, description=description, usage="%(prog)s [options]")
    for title, fields in _topics(cls):
        group = parser.add_argument_group(title)
        for f in fields:
            _add_flag(group, f)
    return parser


def _topics(cls: type[Any]) -> list[tuple[str, list[dataclasses.Field[Any]]]]:
    """The fields of `cls` grouped by the settings class declaring them, in field order; a
    group's title is the first line of that class's docstring."""
    declared_by: dict[str, type[Any]] = {}
    for base in cls.__mro__:
        for name in vars(base).get("__annotations__", {}):
            declared_by.setdefault(name, base)
    groups: dict[type[Any], list[dataclasses.Field[Any]]] = {}
    for f in dataclasses.fields(cls):
        groups.setdefault(declared_by[f.name], []).append(f)
    return [
        ((base.__doc__ or base.__name__).split("\n")[0].rstrip("."), fs)
        for base, fs in groups.items()
    ]


def _add_flag(parser: argparse._ArgumentGroup, f: dataclasses.Field[Any]) -> None:
    rule: Rule = f.metadata.get("rule", Rule())
    facts = [f"default: {show_default(f)}", describe(rule), f"env {env_name(f.name)}"]
    kwargs: dict[str, Any] = {
        "default": None,
        "dest": f.name,
        "help": f"{f.metadata['doc']} [{'; '.join(x for x in facts if x)}]".replace("%", "%%"),
    }
    if _kind(f) == "bool":
        kwargs["action"] = argparse.BooleanOptionalAction
    elif rule.choices:
        kwargs["metavar"] = "{" + ",".join(rule.choices) + "}"
    parser.add_argument(flag_name(f.name), **kwargs)


def _refuse_unknown_variables(cls: type[Any], env: Mapping[str, str]) -> None:
    """A misspelt variable would be ignored: RNNSTREAM_AUTH_TOKEN for RNNSTREAM_AUTH_TOKENS
    would start a server that lets everyone in. Every RNNSTREAM_* variable must be a setting."""
    known = {env_name(f.name) for f in dataclasses.fields(cls)}
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in known and name not in CLIENT_VARIABLES:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
            hint = f"did you mean {close[0]}?" if close else "see rnnstream-server --help"
            raise SettingError(f"{name} is not a setting of rnnstream-server ({hint})")


def read_settings(
    cls: type[T], namespace: argparse.Namespace, env: Mapping[str, str], *, paths: bool = True
) -> T:
    """The settings: each from its flag, else its variable, else its default; every value
    checked against its rule (`paths`: that the files and folders named exist, defaults too)."""
    _refuse_unknown_variables(cls, env)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        given = getattr(namespace, f.name)
        if given is None:
            found, value = from_env(f, env)
            if found:
                values[f.name], sources[f.name] = value, "env"
            continue
        try:
            value = given if isinstance(given, bool) else parse_text(f, given)
            check_value(f, value, paths=False)
        except ValueError as exc:
            raise refusal(f, "flag", str(exc)) from None
        values[f.name], sources[f.name] = value, "flag"
    settings = cls(**values)
    if paths:
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            unless = f.metadata.get("rule", Rule()).unless
            if unless and getattr(settings, unless):
                continue
            try:
                check_value(f, getattr(settings, f.name))
            except ValueError as exc:
                raise refusal(f, sources.get(f.name, ""), str(exc)) from None
    return settings
