"""LoRA settings of `weir serve`: the YAML `lora:` section, --lora-modules / WEIR_LORA_MODULES with the
usual precedence, and errors that name the field and where it came from.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from app.cli import build_parser, main
from app.config import ConfigError, resolve

REPO = Path(__file__).resolve().parents[2]


def _yaml(tmp_path: Path, text: str) -> str:
    cfg = tmp_path / "lora.yaml"
    cfg.write_text(text)
    return str(cfg)


SECTION = """\
model: /m/base
lora:
  enable: true
  max_loras: 3
  max_lora_rank: 32
  max_cpu_loras: 6
  allow_runtime_updating: true
  adapters:
    - {name: sql, path: /a/sql}
    - name: chat
      path: /a/chat=v2
"""


def test_yaml_section_maps_onto_the_options(tmp_path: Path) -> None:
    engine, server = resolve({"config": _yaml(tmp_path, SECTION)}, env={})
    assert (engine.enable_lora, engine.max_loras, engine.max_lora_rank, engine.max_cpu_loras) == (
        True,
        3,
        32,
        6,
    )
    assert server.allow_runtime_lora_updating is True
    assert server.lora_adapters == [("sql", "/a/sql"), ("chat", "/a/chat=v2")]  # only the first '=' splits


def test_precedence_flags_over_env_over_yaml(tmp_path: Path) -> None:
    cfg = _yaml(tmp_path, SECTION)
    _, server = resolve({"config": cfg}, env={"WEIR_LORA_MODULES": "env1=/e/1, env2=/e/2"})
    assert server.lora_adapters == [("env1", "/e/1"), ("env2", "/e/2")]
    args = vars(
        build_parser().parse_args(["serve", "--lora-modules", "f1=/f/1", "--lora-modules", "f2=/f/2"])
    )
    engine, server = resolve(
        {**args, "config": cfg}, env={"WEIR_LORA_MODULES": "env1=/e/1", "WEIR_MAX_LORAS": "5"}
    )
    assert server.lora_adapters == [("f1", "/f/1"), ("f2", "/f/2")]
    assert engine.max_loras == 5 and engine.max_lora_rank == 32  # env over yaml; yaml over default


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        (
            {"lora_modules": ["sql"]},
            {"WEIR_ENABLE_LORA": "1"},
            "invalid lora_modules (from --lora-modules): lora_modules entry 'sql' must be NAME=PATH "
            "(e.g. sql=/adapters/sql)",
        ),
        (
            {"enable_lora": True},
            {"WEIR_LORA_MODULES": "a=/x,a=/y"},
            "invalid lora_modules (from WEIR_LORA_MODULES): lora_modules names the adapter 'a' twice; "
            "each name must be unique",
        ),
        (
            {"lora_modules": ["a=/x"]},
            {},
            "lora_modules (from --lora-modules) needs enable_lora (--enable-lora, WEIR_ENABLE_LORA or "
            "lora.enable in YAML)",
        ),
        (
            {"allow_runtime_lora_updating": True},
            {},
            "allow_runtime_lora_updating (from --allow-runtime-lora-updating) needs enable_lora",
        ),
        (
            {"enable_lora": True, "lora_modules": ["base=/x"], "served_model_name": ["base", "b2"]},
            {},
            "lora_modules (from --lora-modules): the adapter name 'base' is also the base model's served "
            "name (served_model_name: base, b2); rename one of them",
        ),
        (
            {"enable_lora": True, "lora_modules": ["llama-7b=/x"], "model": "/m/llama-7b"},
            {},
            "the adapter name 'llama-7b' is also the base model's served name (served_model_name: llama-7b)",
        ),
    ],
)
def test_bad_settings_name_the_field(flags: dict, env: dict, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        resolve(flags, env=env)
    assert message in str(exc.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lora: [a]\n", "key 'lora' in"),
        ("lora:\n  enabled: true\n", "unknown key 'lora.enabled' in"),
        ("lora:\n  adapters: {name: a, path: /x}\n", "key 'lora.adapters' in"),
        (
            "lora:\n  adapters:\n    - {name: a}\n",
            "entry 0 must be a mapping with the keys name and path (and optionally share)",
        ),
        (
            "lora:\n  adapters:\n    - {name: a, path: /x, weight: 2}\n",
            "entry 0 must be a mapping with the keys name and path (and optionally share)",
        ),
        (
            "lora:\n  enable: true\n  adapters:\n    - {name: a, path: /x, share: 0}\n",
            "invalid lora_shares (from key 'lora.adapters' in",
        ),
        (
            "lora:\n  adapters:\n    - {name: a=b, path: /x}\n",
            "entry 0: name must be a non-empty string without '='",
        ),
        ("lora:\n  adapters:\n    - {name: a, path: ''}\n", "entry 0 ('a'): path must be a non-empty string"),
        ("lora:\n  max_loras: many\n", "key 'lora.max_loras' in"),
        ("lora:\n  max_loras: 0\n", "invalid max_loras (from key 'lora.max_loras' in"),
        ("enable_lora: true\nlora:\n  enable: false\n", "sets enable_lora, which key 'enable_lora' in"),
        (
            "lora:\n  enable: true\n  adapters:\n    - {name: a, path: /x}\n    - {name: a, path: /y}\n",
            "invalid lora_modules (from key 'lora.adapters' in",
        ),
    ],
)
def test_bad_yaml_section_names_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        resolve({"config": _yaml(tmp_path, text)}, env={})
    assert message in str(exc.value)


def test_shipped_multi_lora_example_loads() -> None:
    engine, server = resolve({"config": str(REPO / "config" / "multi-lora.yaml")}, env={})
    assert engine.enable_lora is True and engine.scheduling_policy == "fair"
    names = [name for name, _ in server.lora_adapters]
    assert len(names) >= 2 and not set(names) & set(server.served_model_name)
    assert server.lora_share_map == {"support-bot": 2.0}  # the others keep share 1


def test_serve_exits_2_on_a_missing_adapter_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code = main(["serve", "--enable-lora", "--lora-modules", f"sql={tmp_path / 'nope'}", "--port", "0"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"weir serve: error: lora_modules: the directory '{tmp_path / 'nope'}' of adapter 'sql' does not exist"
    )


def test_adapter_shares_from_yaml_flags_and_env(tmp_path: Path) -> None:
    """Under --scheduling-policy fair an adapter's share comes from its YAML entry, --lora-shares or
    WEIR_LORA_SHARES (the usual precedence); adapters not named keep share 1."""
    text = (
        "scheduling_policy: fair\nlora:\n  enable: true\n  adapters:\n"
        "    - {name: a, path: /x, share: 2}\n    - {name: b, path: /y}\n"
    )
    cfg = _yaml(tmp_path, text)
    engine, server = resolve({"config": cfg}, env={})
    assert engine.scheduling_policy == "fair"
    assert server.lora_share_map == {"a": 2.0}
    _, server = resolve({"config": cfg}, env={"WEIR_LORA_SHARES": "a=0.5,b=3"})
    assert server.lora_share_map == {"a": 0.5, "b": 3.0}
    _, server = resolve({"config": cfg, "lora_shares": ["b=4"]}, env={"WEIR_LORA_SHARES": "a=0.5"})
    assert server.lora_share_map == {"b": 4.0}


@pytest.mark.parametrize(
    ("shares", "message"),
    [
        (["a"], "lora_shares entry 'a' must be NAME=SHARE (e.g. sql=2)"),
        (["a=x"], "lora_shares entry 'a=x': the share must be a number in (0, 1e6]"),
        (["a=-1"], "lora_shares entry 'a=-1': the share must be a number in (0, 1e6]"),
        (["a=nan"], "lora_shares entry 'a=nan': the share must be a number in (0, 1e6]"),
        (["a=1", "a=2"], "lora_shares names the adapter 'a' twice"),
        (["c=1"], "lora_shares names 'c', which lora_modules does not serve (served: a)"),
    ],
)
def test_bad_shares_name_the_option(shares: list[str], message: str) -> None:
    flags = {"enable_lora": True, "lora_modules": ["a=/x"], "lora_shares": shares}
    with pytest.raises(ConfigError) as exc:
        resolve(flags, env={})
    assert message in str(exc.value) and "lora_shares" in str(exc.value)
