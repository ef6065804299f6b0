"""YAML configuration: plain nested data with attribute access.

    cfg = load_config("configs/tiny/vae.yml", ["train.lr=1e-4", "+train.note=debug"])
    cfg.model.depth == cfg["model"]["depth"]
    save_config(cfg, "exp/config.yml")      # fully merged, no `base:` left

A file may name `base: other.yml` (or a list of files), relative to itself; the bases are merged first and the
file's own keys are merged over them recursively (mappings merge, everything else replaces); a key the bases do not
have is refused as a typo unless written `+key:`. Overrides
`a.b.c=value` are applied last; the value is read as YAML, so numbers, booleans, null and lists work. An override
of a key that does not exist is an error (it is almost always a typo) unless written `+a.b.c=value`.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from utils.fileio import atomic_write

__all__ = ["Config", "ConfigError", "load_config", "save_config", "apply_overrides", "merge", "parse_value"]

BASE_KEY = "base"


class ConfigError(ValueError):
    """A configuration file or override is malformed; the message names the file and the key."""


class Config(dict):
    """A dict whose nested mappings are Configs and whose keys are also attributes (`cfg.model.depth`).

    Keys that shadow dict methods (`items`, `keys`, `update`, ...) are reachable only as `cfg["items"]`.
    """

    def __init__(self, data: Mapping | None = None, **kwargs):
        super().__init__()
        self.update(data or {}, **kwargs)

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            # AttributeError (not KeyError) keeps hasattr/getattr(default)/copy/pickle working.
            raise AttributeError(f"config has no key {key!r} (keys: {sorted(map(str, self))})") from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __delattr__(self, key: str) -> None:
        try:
            del self[key]
        except KeyError:
            raise AttributeError(key) from None

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, _wrap(value))

    def update(self, data: Mapping | Iterable = (), **kwargs) -> None:
        for key, value in dict(data, **kwargs).items():
            self[key] = value

    def setdefault(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def copy(self) -> "Config":
        """Shallow copy that stays a Config (dict.copy would return a plain dict)."""
        return Config(self)

    def to_dict(self) -> dict:
        """Plain dicts and lists all the way down (tuples become lists), ready for yaml/json."""
        return _unwrap(self)


def _wrap(value: Any) -> Any:
    if isinstance(value, Config):
        return value
    if isinstance(value, Mapping):
        return Config(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _unwrap(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_unwrap(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------------------
# YAML reading: safe_load semantics plus two fixes.
# 1. YAML 1.1 (PyYAML) reads `1e-6` as the STRING "1e-6" (it wants a dot: 1.0e-6); learning rates and loss
#    weights are written that way all the time, so exponent floats without a dot are floats here.
# 2. A repeated key silently keeps the last value in PyYAML; here it is an error with its line.

class _Loader(yaml.SafeLoader):
    pass


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def _construct_mapping(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark,
                f"found duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_load(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # noqa: S506 - _Loader is a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}{where}: invalid YAML: {problem}") from exc


def parse_value(text: str) -> Any:
    """Read one override value as YAML: `3` -> int, `1e-4` -> float, `true` -> bool, `[1, 2]` -> list, `` -> None."""
    return _yaml_load(text, f"override value {text!r}")


# --------------------------------------------------------------------------------------------------------------

def merge(base: Mapping, other: Mapping) -> Config:
    """Recursive merge, `other` wins: mappings merge key by key, any other value (lists too) replaces."""
    out = Config(copy.deepcopy(_unwrap(base)))  # never shares nested objects with either input
    for key, value in other.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(_unwrap(value))
    return out


def _read_file(path: Path, chain: tuple[Path, ...]) -> Config:
    path = path.resolve()
    if path in chain:
        cycle = " -> ".join(str(p) for p in (*chain, path))
        raise ConfigError(f"{path}: `base` chain loops back on itself: {cycle}")
    if not path.is_file():
        via = f" (named as `base` in {chain[-1]})" if chain else ""
        raise FileNotFoundError(f"config file not found: {path}{via}")
    data = _yaml_load(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(data, Mapping):
        found = "an empty file" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{path}: the top level must be a mapping of keys, found {found}")

    bases = data.get(BASE_KEY)
    own = {k: v for k, v in data.items() if k != BASE_KEY}
    if bases is None:
        return Config(own)
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: key `{BASE_KEY}` must be a file name or a list of file names, found {bases!r}")
    merged = Config()
    for name in bases:  # later bases win over earlier ones, the file itself over all of them
        merged = merge(merged, _read_file(path.parent / name, (*chain, path)))
    return merge(merged, _known_keys(own, merged, path))


def _known_keys(own: Mapping, base: Mapping, path: Path, prefix: str = "") -> dict:
    """`own` with every key checked against its base: a key the base lacks is a typo unless written `+key` (the
    override convention), which adds it. A silently added `max_stepz` would leave max_steps at the base's value."""
    out = {}
    for key, value in own.items():
        name = str(key)
        if name.startswith("+"):
            out[name[1:]] = value
            continue
        if key not in base:
            close = difflib.get_close_matches(name, [str(k) for k in base], n=3)
            hint = f"; did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(f"{path}: unknown key {prefix + name!r}, which its base does not have{hint} "
                              f"(write `+{name}:` to add a new key)")
        both = isinstance(value, Mapping) and isinstance(base[key], Mapping)
        out[key] = _known_keys(value, base[key], path, f"{prefix}{name}.") if both else value
    return out


def _split_override(text: str, source: str) -> tuple[list[str], Any, bool]:
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"{source}: bad override {text!r}: expected `key.path=value` (or `+key.path=value` to add a key)")
    key, value = text.split("=", 1)
    key = key.strip()
    create = key.startswith("+")
    if create:
        key = key[1:]
    parts = key.split(".")
    if not key or any(not p or p != p.strip() for p in parts):
        raise ConfigError(f"{source}: bad override {text!r}: the key path {key!r} has an empty or blank part")
    try:
        parsed = parse_value(value.strip())
    except ConfigError as exc:
        raise ConfigError(f"{source}: bad override {text!r}: {exc}") from None
    return parts, parsed, create


def apply_overrides(cfg: Config, overrides: Iterable[str] = (), source: str = "config") -> Config:
    """Apply `a.b.c=value` overrides in place (and return cfg); `+a.b.c=value` may create missing keys."""
    if isinstance(overrides, str):  # a lone string would otherwise be applied character by character
        overrides = [overrides]
    for text in overrides:
        parts, value, create = _split_override(text, source)
        node = cfg
        for depth, part in enumerate(parts):
            here = ".".join(parts[: depth + 1])
            last = depth == len(parts) - 1
            if not isinstance(node, Mapping):
                raise ConfigError(f"{source}: override {text!r}: {'.'.join(parts[:depth])!r} is a "
                                  f"{type(node).__name__}, not a mapping, so it has no key {part!r}")
            if part not in node:
                if not create:
                    close = difflib.get_close_matches(part, [str(k) for k in node], n=3)
                    hint = f"; did you mean {', '.join(close)}?" if close else f"; keys there: {sorted(map(str, node))}"
                    raise ConfigError(f"{source}: override {text!r}: unknown key {here!r}{hint} "
                                      f"(write `+{'.'.join(parts)}=...` to add a new key)")
                node[part] = Config() if not last else None
            if last:
                node[part] = value
            else:
                node = node[part]
    return cfg


def load_config(path: str | os.PathLike, overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config (resolving `base:` chains), apply overrides, return a Config."""
    path = Path(path)
    cfg = _read_file(path, ())
    return apply_overrides(cfg, overrides, source=str(path))


def save_config(cfg: Mapping, path: str | os.PathLike) -> Path:
    """Write the config as plain YAML (key order kept), atomically: a crash never leaves half a file."""
    text = yaml.safe_dump(_unwrap(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)
