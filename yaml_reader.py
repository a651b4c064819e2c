"""A reader for the YAML openapi.yaml is written in, so the service can serve it as JSON.

The runtime has no YAML library (PyYAML would add 3 MB to a 29 MB install), and the spec needs
little of YAML: block mappings and sequences, flow collections, plain and quoted scalars, `|`
literals and comments. That is all this reads; anything else (anchors, tags, `>` folding,
multi-line plain scalars, duplicate keys, plain scalars YAML 1.1 would read as something other
than a string or a decimal number) raises ValueError naming the line. tests/test_clients.py checks
that its reading of openapi.yaml equals PyYAML's.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from typing import Any

INT = re.compile(r"[-+]?(0|[1-9][0-9]*)")
FLOAT = re.compile(r"[-+]?[0-9]+\.[0-9]*([eE][-+][0-9]+)?")
# Plain scalars that YAML 1.1 (PyYAML) reads as booleans, other numbers, dates or merge keys,
# or that YAML 1.1 and 1.2 readers disagree on: the spec must quote them.
SPECIAL = re.compile(r"yes|Yes|YES|no|No|NO|on|On|ON|off|Off|OFF|=|<<"
                     r"|[-+]?(0b[01_]+|0x[0-9a-fA-F_]+|0[0-7_]+|[0-9][0-9_]*(:[0-5]?[0-9])+(\.[0-9_]*)?"
                     r"|[0-9][0-9_]*(\.[0-9_]*)?([eE][-+]?[0-9]+)?|\.[0-9_]+([eE][-+][0-9]+)?|\.(inf|Inf|INF))"
                     r"|\.(nan|NaN|NAN)|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}(([Tt]|[ \t]+)[0-9]{1,2}:[0-9]{2}.*)?")
FLOW_END = ",]}"
Fail = Callable[[str], ValueError]


def read_yaml(text: str) -> Any:
    """The value of one YAML document written in the subset above."""
    return _Reader(text).document()


class _Reader:
    def __init__(self, text: str) -> None:
        self.lines = text.replace("\r\n", "\n").split("\n")
        self.i = 0  # the line being read
        self.column = 0  # where its unread part starts: its indentation, or further on after "- "
        self._skip_blank()

    def fail(self, what: str) -> ValueError:
        return ValueError(f"openapi.yaml line {self.i + 1}: {what}")

    def document(self) -> Any:
        value = self._node(self.column)
        if self.i < len(self.lines):
            raise self.fail("unexpected indentation")
        return value

    # --- lines

    def _rest(self) -> str:
        return _strip_comment(self.lines[self.i])[self.column:]

    def _next_line(self) -> None:
        self.i += 1
        self._skip_blank()

    def _skip_blank(self) -> None:
        while self.i < len(self.lines) and not _strip_comment(self.lines[self.i]).strip():
            self.i += 1
        if self.i < len(self.lines):
            line = self.lines[self.i]
            self.column = len(line) - len(line.lstrip(" "))
            if line[self.column] == "\t":
                raise self.fail("tabs are not indentation in YAML")

    def _at(self, indent: int) -> bool:
        """Whether the next line continues the block at `indent`."""
        if self.i >= len(self.lines) or self.column < indent:
            return False
        if self.column > indent:
            raise self.fail("unexpected indentation")
        return True

    # --- block nodes

    def _node(self, indent: int) -> Any:
        rest = self._rest()
        return self._sequence(indent) if rest == "-" or rest.startswith("- ") else self._mapping(indent)

    def _sequence(self, indent: int) -> list[Any]:
        items = []
        while self._at(indent) and (self._rest() == "-" or self._rest().startswith("- ")):
            after = self._rest()[1:]
            if not after.strip():
                items.append(self._value("", indent, under_key=False))
                continue
            self.column += 1 + len(after) - len(after.lstrip(" "))
            rest = self._rest()
            if _key_end(rest) is not None and rest[0] not in "[{|":  # "- key: value" starts a mapping
                items.append(self._mapping(self.column))
            else:
                items.append(self._value(rest, indent, under_key=False))
        return items

    def _mapping(self, indent: int) -> dict[str, Any]:
        mapping: dict[str, Any] = {}
        while self._at(indent):
            rest = self._rest()
            end = _key_end(rest)
            if end is None or rest.startswith("- "):
                raise self.fail(f"expected `key: value`, got {rest.strip()!r}")
            key = self._scalar(rest[:end].strip())
            if not isinstance(key, str):
                raise self.fail(f"key {rest[:end]!r} is not a string: quote it")
            if key in mapping:
                raise self.fail(f"duplicate key {key!r}")
            mapping[key] = self._value(rest[end + 1:].strip(), indent, under_key=True)
        return mapping

    def _value(self, text: str, indent: int, under_key: bool) -> Any:
        """The value after `key:` or `-` on the current line, in a block at `indent`; moves past it."""
        if not text:  # the value is the block below, null if there is none
            self._next_line()
            if self.i < len(self.lines) and self.column > indent:
                return self._node(self.column)
            if under_key and self._at(indent) and self._rest().startswith("- "):
                return self._sequence(indent)  # a key's sequence may sit at the key's indentation
            return None
        if text[0] == "|":
            return self._literal(text, indent)
        if text[0] in "[{":
            return self._flow(text)
        if text[0] in ">&*!%@`":
            raise self.fail(f"{text[0]!r} is beyond the YAML this reads")
        value = self._scalar(text)
        self._next_line()
        return value

    def _literal(self, header: str, indent: int) -> str:
        if header not in ("|", "|-", "|+"):
            raise self.fail(f"block scalar header {header!r} is beyond the YAML this reads")
        lines: list[str] = []
        content_indent = None
        self.i += 1
        while self.i < len(self.lines):
            line = self.lines[self.i]
            stripped = line.lstrip(" ")
            if stripped:
                content_indent = len(line) - len(stripped) if content_indent is None else content_indent
                if len(line) - len(stripped) < content_indent or content_indent <= indent:
                    break
            lines.append(line[content_indent or 0:])
            self.i += 1
        self._skip_blank()
        trailing = 0  # blank lines after the last content line
        while lines and not lines[-1].strip():
            lines.pop()
            trailing += 1
        if not lines:
            return ""
        text = "\n".join(lines)
        return {"|-": text, "|": text + "\n", "|+": text + "\n" * (1 + trailing)}[header]

    def _flow(self, text: str) -> Any:
        """The flow collection that starts with `text` on the current line and may go on over more lines."""
        start, parts, depth = self.i, [], 0
        while True:
            depth = _bracket_depth(text, depth)
            parts.append(text)
            if depth == 0:
                break
            self.i += 1
            if self.i >= len(self.lines):
                self.i = start
                raise self.fail("unclosed flow collection")
            text = _strip_comment(self.lines[self.i])
        reader = _FlowReader("\n".join(parts), start)
        value = reader.value()
        if reader.text[reader.pos:].strip():
            raise self.fail(f"unexpected {reader.text[reader.pos:].strip()!r} after a flow collection")
        self._next_line()
        return value

    def _scalar(self, text: str) -> Any:
        if text[0] in "\"'":
            value, end = _quoted(text, 0, self.fail)
            if text[end:].strip():
                raise self.fail(f"unexpected {text[end:].strip()!r} after a quoted scalar")
            return value
        if ": " in text or text.endswith(":"):
            raise self.fail(f"a plain scalar may not contain ': ' ({text!r}): quote it")
        return _plain(text, self.fail)  # a plain scalar continued on a deeper line fails in _at


class _FlowReader:
    """Reads `{...}` and `[...]` collections, which may span lines."""

    def __init__(self, text: str, line: int) -> None:
        self.text, self.pos, self.line = text, 0, line

    def fail(self, what: str) -> ValueError:
        return ValueError(f"openapi.yaml line {self.line + 1 + self.text.count(chr(10), 0, self.pos)}: {what}")

    def _skip_space(self) -> str:
        while self.pos < len(self.text) and self.text[self.pos] in " \n":
            self.pos += 1
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def value(self) -> Any:
        char = self._skip_space()
        if char == "{":
            return self._collection("}", {})
        if char == "[":
            return self._collection("]", [])
        if char in "\"'":
            value, self.pos = _quoted(self.text, self.pos, self.fail)
            return value
        end = self.pos
        while end < len(self.text) and self.text[end] not in FLOW_END + "\n[{" \
                and not (self.text[end] == ":" and self.text[end + 1:end + 2] in ("", " ", "\n", *FLOW_END)):
            end += 1
        plain, self.pos = self.text[self.pos:end].strip(), end
        if not plain:
            raise self.fail("expected a value in a flow collection")
        return _plain(plain, self.fail)

    def _collection(self, close: str, into: Any) -> Any:
        self.pos += 1
        while self._skip_space() != close:
            if isinstance(into, dict):
                key = self.value()
                if not isinstance(key, str) or key in into:
                    raise self.fail(f"flow mapping key {key!r} is not a string, or is repeated")
                if self._skip_space() != ":":
                    raise self.fail(f"expected ':' after {key!r}")
                self.pos += 1
                into[key] = None if self._skip_space() in (",", close) else self.value()
            else:
                into.append(self.value())
                if self._skip_space() == ":":
                    raise self.fail("a `key: value` pair directly in a flow sequence is beyond the YAML this reads")
            separator = self._skip_space()
            if separator == ",":
                self.pos += 1
            elif separator != close:
                raise self.fail(f"expected ',' or {close!r} in a flow collection")
        self.pos += 1
        return into


def _outside_quotes(text: str) -> Iterator[tuple[int, str]]:
    """Each character of the text, with its index, that is not part of a quoted scalar."""
    quote = ""
    for index, char in enumerate(text):
        if quote:
            if char == quote and not (quote == '"' and _escaped(text, index)):
                quote = ""
        elif char in "\"'" and (index == 0 or text[index - 1] in " [{,:-"):
            quote = char  # a quote opens a scalar only where a scalar can start, not in "it's"
        else:
            yield index, char


def _strip_comment(line: str) -> str:
    """The line without its comment: a '#' at its start or after a space, outside quotes."""
    for index, char in _outside_quotes(line):
        if char == "#" and (index == 0 or line[index - 1] in " \t"):
            return line[:index].rstrip()
    return line.rstrip()


def _bracket_depth(text: str, depth: int) -> int:
    """How many flow collections are open at the end of the text, given `depth` open at its start."""
    for _, char in _outside_quotes(text):
        depth += (char in "[{") - (char in "]}")
    return depth


def _escaped(text: str, index: int) -> bool:
    backslashes = len(text[:index]) - len(text[:index].rstrip("\\"))
    return backslashes % 2 == 1


def _key_end(text: str) -> int | None:
    """Where the ':' that ends a block mapping key is, or None if the text is no `key: value`."""
    if text[:1] in "\"'":
        try:
            _, end = _quoted(text, 0, ValueError)
        except ValueError:
            return None
        after = text[end:].lstrip(" ")
        return len(text) - len(after) if after == ":" or after.startswith(": ") else None
    for index, char in enumerate(text):
        if char == ":" and (index + 1 == len(text) or text[index + 1] == " "):
            return index
    return None


def _quoted(text: str, start: int, fail: Fail) -> tuple[str, int]:
    """The quoted scalar at text[start] and the index just past it."""
    quote, index = text[start], start + 1
    while index < len(text):
        if text[index] == quote:
            if quote == "'" and text[index + 1:index + 2] == "'":
                index += 2
                continue
            if quote == '"' and _escaped(text, index):
                index += 1
                continue
            body = text[start + 1:index]
            if "\n" in body:
                break
            if quote == "'":
                return body.replace("''", "'"), index + 1
            try:
                return json.loads(f'"{body}"'), index + 1
            except ValueError:
                raise fail(f"an escape in {text[start:index + 1]} is beyond the YAML this reads") from None
        index += 1
    raise fail(f"unclosed or multi-line quoted scalar {text[start:start + 40]}")


def _plain(text: str, fail: Fail) -> Any:
    if text in ("~", "null", "Null", "NULL"):
        return None
    if text in ("true", "True", "TRUE", "false", "False", "FALSE"):
        return text.lower() == "true"
    if INT.fullmatch(text):
        return int(text)
    if FLOAT.fullmatch(text):
        return float(text)
    if SPECIAL.fullmatch(text):
        raise fail(f"YAML readers disagree on what {text!r} is: quote it")
    return text

