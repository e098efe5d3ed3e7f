"""The LoRA part of `weir serve`'s settings: the YAML `lora:` section, `--lora-modules NAME=PATH`, and
the checks that need both the engine's and the server's options (app/config.py calls in here).

The YAML section is sugar over flat options, so flags and `WEIR_*` variables override it as usual:

    lora:
      enable: true                 # enable_lora
      max_loras: 4                 # max_loras, max_lora_rank, max_cpu_loras: as named
      allow_runtime_updating: true # allow_runtime_lora_updating
      adapters:                    # lora_modules (and lora_shares for the entries with a share)
        - {name: sql, path: /adapters/sql}
        - {name: chat, path: /adapters/chat, share: 2}   # share: under scheduling_policy fair
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from engine.lora.request import valid_fair_weight

# Key in the YAML `lora:` section -> the option it sets.
SECTION_KEYS: dict[str, str] = {
    "enable": "enable_lora",
    "max_loras": "max_loras",
    "max_lora_rank": "max_lora_rank",
    "max_cpu_loras": "max_cpu_loras",
    "adapters": "lora_modules",
    "allow_runtime_updating": "allow_runtime_lora_updating",
}


class LoRASectionError(ValueError):
    """The `lora:` section is malformed; the message names the key."""


def expand_section(section: Any, where: str) -> dict[str, tuple[Any, str]]:
    """The `lora:` mapping as {option name: (raw value, source)}; adapters become NAME=PATH strings."""
    if not isinstance(section, Mapping):
        raise LoRASectionError(
            f"key 'lora' in {where} must be a mapping with keys {', '.join(SECTION_KEYS)}; got {section!r}"
        )
    out: dict[str, tuple[Any, str]] = {}
    for key, raw in section.items():
        name = str(key).replace("-", "_")
        source = f"key 'lora.{key}' in {where}"
        if name not in SECTION_KEYS:
            raise LoRASectionError(
                f"unknown key 'lora.{key}' in {where}; known keys: {', '.join(SECTION_KEYS)}"
            )
        if name == "adapters":
            raw, shares = _adapter_entries(raw, source)
            if shares:
                out["lora_shares"] = (shares, source)
        out[SECTION_KEYS[name]] = (raw, source)
    return out


def _adapter_entries(raw: Any, source: str) -> tuple[list[str], list[str]]:
    """NAME=PATH entries for lora_modules and NAME=SHARE entries for lora_shares."""
    if raw is None:
        return [], []
    if not isinstance(raw, list):
        raise LoRASectionError(f"{source}: expected a list of {{name, path}} mappings; got {raw!r}")
    entries, shares = [], []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping) or not {"name", "path"} <= set(item) <= {"name", "path", "share"}:
            raise LoRASectionError(
                f"{source}: entry {i} must be a mapping with the keys name and path (and optionally share); "
                f"got {item!r}"
            )
        name, path = item["name"], item["path"]
        if not isinstance(name, str) or not name or "=" in name:
            raise LoRASectionError(
                f"{source}: entry {i}: name must be a non-empty string without '='; got {name!r}"
            )
        if not isinstance(path, str) or not path:
            raise LoRASectionError(
                f"{source}: entry {i} ({name!r}): path must be a non-empty string; got {path!r}"
            )
        entries.append(f"{name}={path}")
        if "share" in item:
            shares.append(f"{name}={item['share']}")
    return entries, shares


def parse_lora_shares(entries: list[str], adapter_names: list[str]) -> dict[str, float]:
    """`NAME=SHARE` entries as {name: share}; ValueError starting with `lora_shares` otherwise."""
    shares: dict[str, float] = {}
    for entry in entries:
        name, sep, raw = entry.partition("=")
        name, raw = name.strip(), raw.strip()
        if not sep or not name or not raw:
            raise ValueError(f"lora_shares entry {entry!r} must be NAME=SHARE (e.g. sql=2)")
        try:
            share = float(raw)
        except ValueError:
            share = float("nan")
        if not valid_fair_weight(share):
            raise ValueError(f"lora_shares entry {entry!r}: the share must be a number in (0, 1e6]")
        if name in shares:
            raise ValueError(f"lora_shares names the adapter {name!r} twice")
        if name not in adapter_names:
            known = ", ".join(adapter_names) or "none"
            raise ValueError(
                f"lora_shares names {name!r}, which lora_modules does not serve (served: {known})"
            )
        shares[name] = share
    return shares


def parse_lora_modules(entries: list[str]) -> list[tuple[str, str]]:
    """`NAME=PATH` entries as (name, path) pairs; ValueError starting with `lora_modules` otherwise."""
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for entry in entries:
        name, sep, path = entry.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"lora_modules entry {entry!r} must be NAME=PATH (e.g. sql=/adapters/sql)")
        if name in seen:
            raise ValueError(f"lora_modules names the adapter {name!r} twice; each name must be unique")
        seen.add(name)
        pairs.append((name, path))
    return pairs


def check_lora_settings(
    enable_lora: bool,
    adapters: list[tuple[str, str]],
    allow_runtime_updating: bool,
    served_model_names: list[str],
    sources: Mapping[str, str],
) -> str | None:
    """The cross-option problem, as a message naming the options and where they came from; None if fine."""

    def src(name: str) -> str:
        return sources.get(name, "its default")

    if adapters and not enable_lora:
        return (
            f"lora_modules (from {src('lora_modules')}) needs enable_lora (--enable-lora, WEIR_ENABLE_LORA "
            "or lora.enable in YAML)"
        )
    if allow_runtime_updating and not enable_lora:
        return (
            f"allow_runtime_lora_updating (from {src('allow_runtime_lora_updating')}) needs enable_lora "
            "(--enable-lora, WEIR_ENABLE_LORA or lora.enable in YAML)"
        )
    for name, _ in adapters:
        if name in served_model_names:
            return (
                f"lora_modules (from {src('lora_modules')}): the adapter name {name!r} is also the base "
                f"model's served name (served_model_name: {', '.join(served_model_names)}); rename one of them"
            )
    return None
