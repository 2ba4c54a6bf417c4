"""Run configs: `configs/*.py` files with `get_config() -> ml_collections.ConfigDict`, plus CLI overrides.

An override is `dotted.key=value`; the value is parsed as a Python literal when it is one (`3`, `1e-4`,
`True`, `(2, 4)`, `None`), else kept as a string. A key the config does not have is refused by name.
"""

from __future__ import annotations

import ast
import importlib.util
import traceback
from pathlib import Path

import ml_collections


class ConfigError(ValueError):
    """A config file or override that cannot be applied."""


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_jaxground_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ConfigError(f"{path} has no get_config()")
        config = module.get_config()
    except ConfigError:
        raise
    except SyntaxError as e:
        raise ConfigError(f"{path}:{e.lineno}: {e.msg}") from None
    except Exception as e:  # noqa: BLE001 - the config file's own code failed: where, and why
        here = [f.lineno for f in traceback.extract_tb(e.__traceback__) if Path(f.filename).resolve() == path.resolve()]
        raise ConfigError(f"{path}{f':{here[-1]}' if here else ''}: {type(e).__name__}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config() returned {type(config).__name__}, not an ml_collections.ConfigDict")
    return config


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# keys a run config carries but the commands set themselves: an override would be silently replaced
DERIVED = {
    "data.batch_size": "the per-host batch is train.batch_size (training) or eval.batch_size (evaluation) divided "
                       "by the number of hosts; set those",
}


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Applies `a.b=value` overrides in place; an unknown key, one in `DERIVED`, or `train.stage` alone where the
    config's trainable set is not that stage's raises ConfigError naming it."""
    keys = set()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        keys.add(key)
        if key in DERIVED:
            raise ConfigError(f"{key} cannot be overridden: {DERIVED[key]}")
        node = config
        parts = key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
                raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])!r} (known here: {known})")
            if i < len(parts) - 1:
                node = node[part]
        value = _parse_value(text)
        old = node[parts[-1]]
        if isinstance(value, bool) and isinstance(old, (int, float)) and not isinstance(old, bool):
            raise ConfigError(f"config key {key!r} is a number ({old!r}), got {text}")  # ml_collections takes it
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(old, tuple) and isinstance(value, list):
            value = tuple(value)
        try:
            node[parts[-1]] = value
        except TypeError as e:
            raise ConfigError(f"config key {key!r}: {e}") from None
    _check_stage_override(config, keys)
    return config


def _check_stage_override(config: ml_collections.ConfigDict, keys: set[str]) -> None:
    """`train.stage` names the stage; `train.trainable`/`train.frozen` decide what trains. Overridden alone, the
    stage would keep the config's set, which is the new stage's only if the config used that stage's defaults."""
    if "train.stage" not in keys or keys & {"train.trainable", "train.frozen"}:
        return
    from jaxground.train.defaults import STAGE_TRAINABLE, stage_patterns_hint

    stage, train = config.train.stage, config.train
    configured = (tuple(train.trainable), tuple(train.frozen))
    if stage in STAGE_TRAINABLE and configured != STAGE_TRAINABLE[stage]:
        raise ConfigError(
            f"train.stage={stage} overridden alone: what trains comes from train.trainable/train.frozen, here "
            f"{configured}, not stage {stage}'s; use a stage-{stage} config or also set "
            f"{stage_patterns_hint(stage)} (or the patterns you want)")


def load_config(path: str | Path, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    return apply_overrides(load_config_file(path), list(overrides))
