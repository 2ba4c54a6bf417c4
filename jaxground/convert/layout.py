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

# the standard library's own regex parser (private, as `re._parser` since Python 3.11): a pattern as a tree
from re import _constants as sre_op
from re import _parser as sre_parse

import numpy as np


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


@functools.cache
def _parsed(pattern: str):
    return sre_parse.parse(pattern)


def _fill(tree, groups: dict[int, str]) -> str | None:
    """One string the parsed pattern matches, with capture groups set to `groups`; None when it cannot tell."""
    out = []
    for op, arg in tree:
        if op is sre_op.LITERAL:
            piece = chr(arg)
        elif op is sre_op.SUBPATTERN:
            group, _, _, sub = arg
            piece = groups.get(group) if group is not None else _fill(sub, groups)
        elif op is sre_op.BRANCH:
            piece = _fill(arg[1][0], groups)
        elif op in (sre_op.MAX_REPEAT, sre_op.MIN_REPEAT) and arg[:2] == (0, 1):
            piece = _fill(arg[2], groups)
        elif op is sre_op.IN and arg[0][0] is sre_op.LITERAL:  # a branch of single characters
            piece = chr(arg[0][1])
        else:  # a free repeat or character class outside a group: no one key to name
            return None
        if piece is None:
            return None
        out.append(piece)
    return "".join(out)


def torch_key(rule, target: str) -> str | None:
    """The torch key `rule` maps onto `target` (an NNX path, or `path[i]` for a row of a stacked one), or None."""
    if rule.target is None:
        return None
    m = _template(rule.target).fullmatch(target)
    if m is None:
        return None
    key = _fill(_parsed(rule.pattern), {int(k[1:]): v for k, v in m.groupdict().items()})
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
