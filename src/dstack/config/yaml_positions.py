"""YAML loading that remembers where each value was written, for file:line:column errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

from dstack.config.files import LONE_SURROGATE
from dstack.core.errors import ConfigError

Path_ = tuple[Any, ...]


@dataclass
class Located:
    """Plain data plus the (line, column) of every value and key, by path; 1-based."""

    file: str
    data: Any
    positions: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    key_positions: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    number_texts: dict[Path_, str] = field(default_factory=dict)

    def where(self, path: Path_, key: bool = False) -> tuple[int | None, int | None]:
        """The position of `path`, or of its closest written ancestor."""
        table = self.key_positions if key else self.positions
        p = tuple(path)
        while p:
            if p in table:
                return table[p]
            if not key and p in self.key_positions:
                return self.key_positions[p]
            p = p[:-1]
        return self.positions.get((), (None, None))

    def error(self, path: Path_, message: str, hint: str | None = None, key: bool = False) -> ConfigError:
        line, col = self.where(path, key=key)
        return ConfigError(message, hint=hint, file=self.file, line=line, column=col)


_MAX_VALUES = 100_000  # aliases may expand exponentially ("billion laughs")


def _build(node: yaml.Node, path: Path_, out: Located, loader: yaml.SafeLoader, open_: set[int]) -> Any:
    def fail(message: str, mark: yaml.Mark) -> ConfigError:
        return ConfigError(message, file=out.file, line=mark.line + 1, column=mark.column + 1)

    if id(node) in open_:
        raise fail("a YAML alias refers to a value that contains it", node.start_mark)
    if len(out.positions) > _MAX_VALUES:
        raise fail(f"the file has more than {_MAX_VALUES} values (once aliases are expanded)", node.start_mark)
    out.positions[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        open_.add(id(node))
        result: dict = {}
        merged: dict = {}  # `<<: *anchor` (or a list of them): keys written here win over merged ones
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for source in sources:
                    if not isinstance(source, yaml.MappingNode):
                        raise fail("`<<` merges mappings only, e.g. `<<: *defaults`", source.start_mark)
                    for k, v in _build(source, path, out, loader, open_).items():
                        merged.setdefault(k, v)
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise fail("a key must be a plain value", key_node.start_mark)
            key = loader.construct_object(key_node)
            if key in result:
                err = fail(f"duplicate key '{key}'", key_node.start_mark)
                err.hint = "each key may appear once in a mapping"
                raise err
            out.key_positions[path + (key,)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            result[key] = _build(value_node, path + (key,), out, loader, open_)
        open_.discard(id(node))
        return {**{k: v for k, v in merged.items() if k not in result}, **result}
    if isinstance(node, yaml.SequenceNode):
        open_.add(id(node))
        items = [_build(item, path + (i,), out, loader, open_) for i, item in enumerate(node.value)]
        open_.discard(id(node))
        return items
    value = loader.construct_object(node)
    if isinstance(value, int | float) and not isinstance(value, bool):
        out.number_texts[path] = node.value  # `1.50` as written, for values that end up as text
    if isinstance(value, str) and LONE_SURROGATE.search(value):
        value = _text(value, node, fail)
    return value


def _text(value: str, node: yaml.Node, fail) -> str:
    """A string with UTF-16 escapes ("\\ud83d\\ude00", as JSON writers put them): a pair is one character;
    a lone half is no character at all."""
    joined = value.encode("utf-16", "surrogatepass").decode("utf-16", "surrogatepass")
    if LONE_SURROGATE.search(joined):
        err = fail("a '\\u' escape here is half of a UTF-16 pair, not a character", node.start_mark)
        err.hint = "write the character itself, or \\U and its 8 hex digits"
        raise err
    return joined


def load_text(text: str, file: str) -> Located:
    out = Located(file=file, data=None)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or "malformed YAML"
        hint = None
        if "found character '\\t'" in problem or "\t" in problem:
            hint = "indent with spaces, not tabs"
        elif "could not find expected ':'" in problem and e.context_mark:
            mark = e.context_mark  # where the key without its ':' starts, not where the parser gave up
            hint = "a key needs a ':' after it, e.g. `commands:`"
        elif "mapping values are not allowed" in problem:
            hint = ("a ':' where no mapping can start: a key above may lack its ':' (`name a` instead of "
                    "`name: a`), or a value holds ': ' and needs quotes")
        elif e.context and "flow" in e.context:
            hint = ("inside [ ] or { }, a value with ',', ':', '{' or '}' needs quotes, e.g. \"${{ x }}\"; "
                    "or write the list one '- item' per line")
        elif e.context:
            hint = e.context
        raise ConfigError(
            f"malformed YAML: {problem}",
            hint=hint,
            file=file,
            line=mark.line + 1 if mark else None,
            column=mark.column + 1 if mark else None,
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"malformed YAML: {e}", file=file) from None
    if node is None:
        out.data = None
        return out
    try:
        # a loader per file: a shared one would keep every node it ever built
        out.data = _build(node, (), out, yaml.SafeLoader(""), set())
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        raise ConfigError(
            f"malformed YAML: {e.problem}", file=file, line=mark.line + 1 if mark else None,
            column=mark.column + 1 if mark else None,
        ) from None
    return out
