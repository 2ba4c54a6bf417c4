"""A model's torch layout derived from its conversion rules, each rule run backwards.

A `Rule` maps a torch key pattern onto an NNX path template. For a variable's path, `torch_key` fills the pattern
with the groups the template captures from that path. Where the pattern offers a choice it takes the first
alternative and includes optional parts: the rule tables list the official names first (`blocks|layers`,
`norm1|layer_norm1`) and their optional parts are the released form (`vision_model.` under the vision tower).
A key is kept only if the rule maps it forward onto the same path, so `jaxground convert` reads every key given
back into its array. This names the arrays of models that never came from torch (training checkpoints, fresh heads).
"""

from __future__ import annotations

import functools
import re

import numpy as np

# what a rule pattern may hold besides escaped literals: `(\d+)` groups, `(?:a|b)` choices, `?` optional parts
_SPECIAL = set("()|?*+[]{}^$")


def _fill(pattern: str, groups: dict[int, str]) -> str | None:
    r"""One string `pattern` matches, with capture group i set to `groups[i]`: the first alternative of a choice,
    optional parts included. None when the pattern has no one key to name (`.*`, a bare `\d+`, a group with no
    value). Reads the subset of regex the rule tables use; anything else raises ValueError."""
    pos, opened = 0, 0

    def joined(pieces: list) -> str | None:
        return None if None in pieces else "".join(pieces)

    def choice() -> str | None:  # up to the closing parenthesis or the end: the first alternative
        nonlocal pos
        branches, pieces = [], []
        while pos < len(pattern) and pattern[pos] != ")":
            if pattern[pos] == "|":
                branches.append(pieces)
                pieces, pos = [], pos + 1
                continue
            piece = atom()
            if pos < len(pattern) and pattern[pos] in "?*+":
                piece = piece if pattern[pos] == "?" else None  # optional: included; any count: no one key
                pos += 1
            pieces.append(piece)
        return joined(branches[0] if branches else pieces)

    def atom() -> str | None:
        nonlocal pos, opened
        c = pattern[pos]
        if c == "\\":
            pos += 2
            return None if pattern[pos - 1].isalnum() else pattern[pos - 1]  # \d and the like: a class
        if c == "(":
            capture = not pattern.startswith("(?:", pos)
            pos += 1 if capture else 3
            opened += capture
            number, inner = opened, choice()
            if pos >= len(pattern):
                raise ValueError(f"unbalanced parenthesis in rule pattern {pattern!r}")
            pos += 1
            return groups.get(number) if capture else inner
        if c in _SPECIAL:
            raise ValueError(f"rule pattern {pattern!r} uses {c!r}, which layout derivation does not read")
        pos += 1
        return None if c == "." else c  # an unescaped dot: any character

    out = choice()
    if pos != len(pattern):
        raise ValueError(f"unbalanced parenthesis in rule pattern {pattern!r}")
    return out


@functools.cache
def _template(target: str) -> re.Pattern:
    """`llm.layers.\\1.q.kernel` -> a regex capturing group 1 from a path (a group named twice must agree)."""
    out, seen = [], set()
    for i, part in enumerate(re.split(r"\\(\d+)", target)):
        if i % 2 == 0:
            out.append(re.escape(part))
        else:
            out.append(f"(?P=g{part})" if part in seen else f"(?P<g{part}>[^.\\[\\]]+)")
            seen.add(part)
    return re.compile("".join(out))


def torch_key(rule, target: str) -> str | None:
    """The torch key `rule` maps onto `target` (an NNX path, or `path[i]` for a row of a stacked one), or None."""
    if rule.target is None:
        return None
    m = _template(rule.target).fullmatch(target)
    if m is None:
        return None
    key = _fill(rule.pattern, {int(k[1:]): v for k, v in m.groupdict().items()})
    return key if key is not None and rule.match(key) == (True, target) else None


def _entry(rules, path: str, index: int | None, shape: tuple, dtype: str) -> dict | None:
    from jaxground.convert.export import INVERSES, transform_name

    target = path if index is None else f"{path}[{index}]"
    for rule in rules:
        key = torch_key(rule, target)
        if key is not None:
            name = transform_name(rule.transform)
            torch_shape = INVERSES[name](np.broadcast_to(np.zeros((), np.float32), shape)).shape
            return {"key": key, "path": path, "index": index, "transform": name, "shape": list(torch_shape),
                    "dtype": dtype}
    return None


def derive_layout(rules, variables: dict[str, tuple[tuple, str]]) -> tuple[list[dict], list[str]]:
    """(torch_layout entries as `jaxground convert` writes them, paths no rule names) for variables
    {path: (shape, torch dtype name)}. A variable no rule names whole is named row by row (a stacked parameter,
    rules targeting `path[i]`)."""
    entries, unnamed = [], []
    for path, (shape, dtype) in variables.items():
        whole = _entry(rules, path, None, shape, dtype)
        if whole is not None:
            entries.append(whole)
            continue
        rows = [_entry(rules, path, 0, shape[1:], dtype)] if shape else [None]
        if rows[0] is not None:  # only then try every row: a large unnamed array would cost one try per row
            rows += [_entry(rules, path, i, shape[1:], dtype) for i in range(1, shape[0])]
        if all(rows):
            entries += rows
        else:
            unnamed.append(path)
    return entries, unnamed
