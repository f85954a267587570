"""A reader of protobuf text format (Triton's config.pbtxt) into plain dicts, without protobuf:
every field maps to the list of its values, a nested message is a dict."""

from __future__ import annotations

import ast
import re
from typing import Any

__all__ = ["PbtxtError", "parse_pbtxt"]

Message = dict[str, list[Any]]

_TOKEN = re.compile(
    r"""(?P<space>\s+|\#[^\n]*)
      | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
      | (?P<punct>[{}\[\]<>:;,])
      | (?P<word>[^\s{}\[\]<>:;,"'\#]+)""",
    re.VERBOSE,
)
_CLOSING = {"{": "}", "<": ">"}
_INT = re.compile(r"[+-]?(0x[0-9a-fA-F]+|\d+)")


class PbtxtError(ValueError):
    """The text is not protobuf text format; the message says where."""


def _tokens(text: str) -> list[tuple[str, str, int]]:
    """(kind, text, line) of every token but blanks and comments."""
    found: list[tuple[str, str, int]] = []
    position, line = 0, 1
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise PbtxtError(f"line {line}: unexpected {text[position]!r}")
        kind = match.lastgroup or ""
        if kind != "space":
            found.append((kind, match.group(), line))
        line += match.group().count("\n")
        position = match.end()
    return found


def _scalar(kind: str, text: str) -> Any:
    if kind == "string":
        return ast.literal_eval(text)
    if _INT.fullmatch(text):
        return int(text, 0)
    if text in ("true", "True", "t"):
        return True
    if text in ("false", "False", "f"):
        return False
    try:
        return float(text)
    except ValueError:
        return text  # an enum value's name


class _Parser:
    def __init__(self, text: str) -> None:
        self._tokens = _tokens(text)
        self._at = 0

    def _peek(self) -> tuple[str, str, int] | None:
        return self._tokens[self._at] if self._at < len(self._tokens) else None

    def _next(self, what: str) -> tuple[str, str, int]:
        token = self._peek()
        if token is None:
            raise PbtxtError(f"the text ends where {what} was expected")
        self._at += 1
        return token

    def _skip(self, *texts: str) -> bool:
        token = self._peek()
        if token is not None and token[0] == "punct" and token[1] in texts:
            self._at += 1
            return True
        return False

    def message(self, closing: str | None) -> Message:
        fields: Message = {}
        while True:
            token = self._peek()
            if token is None:
                if closing is not None:
                    raise PbtxtError(f"the text ends before its closing {closing!r}")
                return fields
            if token[0] == "punct" and token[1] == closing:
                self._at += 1
                return fields
            kind, name, line = self._next("a field name")
            if kind != "word":
                raise PbtxtError(f"line {line}: expected a field name, got {name!r}")
            self._skip(":")
            fields.setdefault(name, []).extend(self._values())
            self._skip(";", ",")

    def _values(self) -> list[Any]:
        if self._skip("["):
            values: list[Any] = []
            while not self._skip("]"):
                values.extend(self._values())
                self._skip(",")
            return values
        kind, text, line = self._next("a value")
        if kind == "punct" and text in _CLOSING:
            return [self.message(_CLOSING[text])]
        if kind == "punct":
            raise PbtxtError(f"line {line}: expected a value, got {text!r}")
        if kind == "string":  # adjacent strings are one value
            parts = [text]
            while (token := self._peek()) is not None and token[0] == "string":
                parts.append(self._next("a string")[1])
            return ["".join(_scalar("string", p) for p in parts)]
        return [_scalar(kind, text)]


def parse_pbtxt(text: str) -> Message:
    """The fields of a text-format message: name -> its values (nested messages as dicts)."""
    return _Parser(text).message(None)
