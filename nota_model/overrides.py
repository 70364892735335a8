"""`--set a.b=value` overrides, shared by every command that takes a config: parsed into a nested dict (values
read as YAML) and merged over a config's own nested dict, key by key."""

from __future__ import annotations

from typing import Any

import yaml


def parse_overrides(assignments: list[str]) -> dict[str, Any]:
    """`a.b=value` pairs (values parsed as YAML) -> nested dict."""
    overrides: dict[str, Any] = {}
    for assignment in assignments:
        dotted, _, value = assignment.partition("=")
        *parents, leaf = dotted.split(".")
        node = overrides
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = yaml.safe_load(value)
    return overrides


def deep_merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in: nested dicts merge, any other value replaces."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
