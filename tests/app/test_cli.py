"""`weir serve` configuration: every option documented, flags > env > YAML > defaults, bad settings
fail at start naming the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import os
import select
from pathlib import Path

import pytest

from app.cli import build_parser, main
from app.config import ENGINE_HELP, ConfigError, ServerConfig, all_options, default_model_dir, resolve
from engine.config import EngineConfig
from engine.worker import compile_pool

REPO = Path(__file__).resolve().parents[2]


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for opt in all_options():
        if opt.name != "model":
            assert opt.flag in out, opt.flag
            assert opt.env in out, opt.env
    assert "MODEL_DIR" in out and "--config" in out and "SIGTERM" in out


def test_every_engine_field_has_written_help() -> None:
    """A new EngineConfig field gets a flag automatically; this asks for a sentence of help for it."""
    assert set(ENGINE_HELP) == {o.name for o in all_options() if o.target == "engine"}
    assert set(EngineConfig.field_names()) - set(ENGINE_HELP) == {"usage"}  # the program's, not an option


def test_defaults_and_default_model() -> None:
    engine, server = resolve({}, env={})
    assert engine.model == default_model_dir()
    assert Path(engine.model).parent.name == "engine"
    assert server == dataclasses.replace(ServerConfig(), served_model_name=["default_model"])
    assert engine == EngineConfig(model=default_model_dir(), usage="server")


def test_precedence_flags_env_yaml_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_num_seqs: 8\nport: 7000\nhost: 10.0.0.1\nmax-model-len: 100\nenforce_eager: true\n")
    env = {"WEIR_PORT": "7100", "WEIR_MAX_NUM_SEQS": "16", "WEIR_API_KEY": "a, b", "WEIR_UNRELATED": "x"}
    engine, server = resolve({"config": str(cfg), "model": "/m/llama-7b", "port": "7200"}, env=env)
    assert server.port == 7200  # flag
    assert engine.max_num_seqs == 16  # env over yaml
    assert server.host == "10.0.0.1"  # yaml
    assert engine.max_model_len == 100 and engine.enforce_eager is True  # yaml, dashed key
    assert engine.block_size == 16  # default
    assert server.api_key == ["a", "b"]
    assert server.served_model_name == ["llama-7b"]
    assert engine.model == "/m/llama-7b"


def test_config_path_from_env(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("shutdown_timeout: 2.5\n")
    _, server = resolve({}, env={"WEIR_CONFIG": str(cfg)})
    assert server.shutdown_timeout == 2.5


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("max_num_sequences: 4\n", "unknown key 'max_num_sequences'"),
        ("max_num_seqs: lots\n", "key 'max_num_seqs' in"),
        ("max_num_seqs: 0\n", "invalid max_num_seqs (from key 'max_num_seqs' in"),
        ("block_size: 7\n", "block_size must be one of 8, 16, 32, 64; got 7"),
        ("enforce_eager: maybe\n", "key 'enforce_eager' in"),
        ("port: 70000\n", "invalid port (from key 'port' in"),
        ("log_level: loud\n", "log_level must be one of"),
        ("- a\n- b\n", "must be a mapping"),
        ("dtype: [float16]\n", "key 'dtype' in"),
    ],
)
def test_bad_yaml_names_the_key(tmp_path: Path, yaml_text: str, message: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml_text)
    with pytest.raises(ConfigError) as exc:
        resolve({"config": str(cfg)}, env={})
    assert message in str(exc.value)


def test_bad_env_and_flag_name_the_source() -> None:
    with pytest.raises(ConfigError, match="environment variable WEIR_MAX_NUM_SEQS: expected an integer"):
        resolve({}, env={"WEIR_MAX_NUM_SEQS": "many"})
    with pytest.raises(
        ConfigError, match=r"invalid gpu_memory_utilization \(from --gpu-memory-utilization\)"
    ):
        resolve({"gpu_memory_utilization": "1.5"}, env={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        resolve({"config": "/nonexistent/weir.yaml"}, env={})


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            "shutdown_timeout",
            "invalid shutdown_timeout (from --shutdown-timeout): shutdown_timeout must be >= 0; got nan",
        ),
        (
            "header_timeout",
            "invalid header_timeout (from --header-timeout): header_timeout must be > 0; got nan",
        ),
        ("sse_keepalive", "invalid sse_keepalive (from --sse-keepalive): sse_keepalive must be > 0; got nan"),
        (
            "cpu_kv_cache_gb",
            "invalid cpu_kv_cache_gb (from --cpu-kv-cache-gb): cpu_kv_cache_gb must be a finite number > 0; got nan",
        ),
    ],
)
def test_nan_is_refused_naming_the_option(option: str, message: str) -> None:
    """NaN fails every comparison, so `x < 0` / `x <= 0` checks let it through (a NaN timeout)."""
    with pytest.raises(ConfigError) as exc:
        resolve({option: "nan"}, env={})
    assert str(exc.value) == message


def test_a_kv_cache_larger_than_memory_names_the_option(
    capsys: pytest.CaptureFixture[str], tiny_llama_dir: Path
) -> None:
    """It ended in the allocator's "[enforce fail at alloc_cpu.cpp:127] ..." naming no option."""
    assert (
        main(["serve", str(tiny_llama_dir), "--device", "cpu", "--port", "0", "--cpu-kv-cache-gb", "1e9"])
        == 1
    )
    assert capsys.readouterr().err.splitlines()[-1] == (
        "weir serve: error: cannot load the model: cannot allocate the KV cache: 131072000000000 blocks of "
        "8192 bytes (1000000000.0 GiB, from cpu_kv_cache_gb 1000000000.0) do not fit in memory; lower it"
    )


def test_lora_sizes_without_enable_lora_are_refused() -> None:
    """--max-loras and the like without --enable-lora were silently ignored."""
    with pytest.raises(ConfigError) as exc:
        resolve({"max_loras": "4"}, env={})
    assert str(exc.value) == (
        "max_loras (from --max-loras) needs enable_lora (--enable-lora, WEIR_ENABLE_LORA or lora.enable in "
        "YAML); without it no adapter is served"
    )
    with pytest.raises(ConfigError, match=r"^max_lora_rank \(from WEIR_MAX_LORA_RANK\) needs"):
        resolve({}, env={"WEIR_MAX_LORA_RANK": "64"})
    engine, _ = resolve({"max_loras": "4", "enable_lora": True}, env={})
    assert engine.max_loras == 4


@pytest.mark.parametrize(
    ("env", "flags", "message"),
    [
        ({"WEIR_API_KEY": ","}, {}, "environment variable WEIR_API_KEY has no key, only empty entries"),
        ({"WEIR_API_KEY": " , "}, {}, "environment variable WEIR_API_KEY has no key, only empty entries"),
        ({"WEIR_API_KEY": ""}, {}, "environment variable WEIR_API_KEY has no key, only empty entries"),
        ({"WEIR_API_KEY": "k1,,k2"}, {}, "environment variable WEIR_API_KEY entry 2 of 3 is empty"),
        ({}, {"api_key": [""]}, "option --api-key has no key, only empty entries"),
        ({}, {"api_key": ["k1", " "]}, "option --api-key entry 2 of 2 is empty"),
    ],
)
def test_an_api_key_with_empty_entries_is_refused(env: dict, flags: dict, message: str) -> None:
    """WEIR_API_KEY="," dropped its empty entries and left no key: authentication silently off. The
    message does not echo the value (it holds the keys)."""
    with pytest.raises(ConfigError) as exc:
        resolve(flags, env=env)
    assert str(exc.value) == (
        f"{message}; give one or more non-empty keys (comma-separated in the environment), or leave it "
        "unset for no authentication"
    )
    assert "k1" not in str(exc.value)


def test_serve_exits_2_on_an_api_key_of_empty_entries(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("WEIR_API_KEY", ",")
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.startswith(
        "weir serve: error: environment variable WEIR_API_KEY has no key, only empty entries;"
    )
    cfg = tmp_path / "c.yaml"  # an explicit empty list in YAML (config/default.yaml's) means no keys
    cfg.write_text("api_key: []\n")
    monkeypatch.delenv("WEIR_API_KEY")
    assert resolve({"config": str(cfg)}, env={})[1].api_key == []


def test_parser_flags_types_and_repeats() -> None:
    args = vars(
        build_parser().parse_args(
            [
                "serve",
                "/m",
                "--api-key",
                "k1",
                "--api-key",
                "k2",
                "--no-enable-prefix-caching",
                "--max-model-len",
                "auto",
                "--served-model-name",
                "a",
            ]
        )
    )
    engine, server = resolve(args, env={"WEIR_MAX_MODEL_LEN": "64"})
    assert server.api_key == ["k1", "k2"]
    assert engine.enable_prefix_caching is False
    assert engine.max_model_len is None  # the flag's "auto" beats the env's 64
    assert server.served_model_name == ["a"]
    assert "port" not in args  # options not given stay out, so env and YAML can fill them


@pytest.mark.parametrize("name", ["default.yaml", "example-production.yaml"])
def test_shipped_configs_load(name: str) -> None:
    engine, server = resolve({"config": str(REPO / "config" / name)}, env={})
    if name == "default.yaml":  # spells out the defaults exactly
        assert engine == EngineConfig(model=default_model_dir(), usage="server")
        assert server == dataclasses.replace(ServerConfig(), served_model_name=["default_model"])
    else:
        assert server.served_model_name == ["qwen2.5-7b-instruct", "default"]


def test_serve_exits_2_on_bad_settings(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["serve", str(tmp_path / "missing-model")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--max-num-seqs", "-1"]) == 2
    assert "invalid max_num_seqs (from --max-num-seqs)" in capsys.readouterr().err


def test_serve_exits_2_on_a_bad_compile_workers_count(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """WEIR_COMPILE_WORKERS is read on CUDA only, before anything loads (the workers start first)."""
    monkeypatch.setenv("WEIR_COMPILE_WORKERS", "many")
    assert main(["serve", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "weir serve: error: WEIR_COMPILE_WORKERS must be a whole number >= 0 (0: off); got 'many'" in err


def test_serve_exits_2_on_a_bad_tuning_switch(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tuning switch of ops/env_flags.py set to anything but 0 or 1 stops `weir serve` before anything
    loads, naming it (on any device)."""
    monkeypatch.setenv("WEIR_FP8_KV_WIDEN", "on")
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "weir serve: error: WEIR_FP8_KV_WIDEN must be 0 or 1 (unset: 1); got 'on'" in err


def test_serve_exits_2_on_a_bad_gc_gen0_before_loading_the_model(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """WEIR_GC_GEN0 was first read once serving started: the model loaded, then a traceback and exit 1."""
    import engine.async_engine

    def no_engine(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model must not load")

    monkeypatch.setattr(engine.async_engine, "AsyncEngine", no_engine)
    monkeypatch.setenv("WEIR_GC_GEN0", "abc")
    assert main(["serve", "--device", "cpu", "--port", "0"]) == 2
    assert (
        capsys.readouterr().err == "weir serve: error: WEIR_GC_GEN0 must be a positive integer; got 'abc'\n"
    )


def test_serve_ends_its_compile_workers_when_it_exits_early(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The workers start before the device check; a start-up that stops there (no GPU here) ends them
    (they do not linger as idle processes). Checked on the OS's processes: the executor's manager
    thread reaps its workers itself, so multiprocessing's own bookkeeping can show one as alive."""
    monkeypatch.setenv("WEIR_COMPILE_WORKERS", "2")
    pids: list[int] = []
    real_start = compile_pool.start

    def start(workers: int) -> bool:
        running = real_start(workers)
        pids.extend(compile_pool._pool._processes)  # the executor's {pid: process}
        return running

    monkeypatch.setattr(compile_pool, "start", start)
    assert main(["serve", "--device", "cuda"]) == 2
    assert "weir serve: error:" in capsys.readouterr().err
    assert len(pids) == 2 and compile_pool.running() == 0
    for pid in pids:
        try:
            handle = os.pidfd_open(pid)
        except ProcessLookupError:
            continue  # exited and reaped
        try:
            assert select.select([handle], [], [], 30)[0], f"compile worker {pid} still running"
        finally:
            os.close(handle)


def test_long_prefill_token_threshold_from_flag_env_and_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("long_prefill_token_threshold: 256\n")
    assert resolve({"config": str(cfg)}, env={})[0].long_prefill_token_threshold == 256
    env = {"WEIR_LONG_PREFILL_TOKEN_THRESHOLD": "384"}
    assert resolve({"config": str(cfg)}, env=env)[0].long_prefill_token_threshold == 384
    flags = {"config": str(cfg), "long_prefill_token_threshold": 512}
    assert resolve(flags, env=env)[0].long_prefill_token_threshold == 512


def test_fit_mixed_steps_to_cuda_graphs_from_flag_env_and_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("fit_mixed_steps_to_cuda_graphs: false\n")
    assert resolve({"config": str(cfg)}, env={})[0].fit_mixed_steps_to_cuda_graphs is False
    env = {"WEIR_FIT_MIXED_STEPS_TO_CUDA_GRAPHS": "true"}
    assert resolve({"config": str(cfg)}, env=env)[0].fit_mixed_steps_to_cuda_graphs is True
    flags = {"config": str(cfg), "fit_mixed_steps_to_cuda_graphs": False}
    assert resolve(flags, env=env)[0].fit_mixed_steps_to_cuda_graphs is False
    assert resolve({}, env={})[0].fit_mixed_steps_to_cuda_graphs is True  # on by default


def test_fair_base_share_from_flag_env_and_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("scheduling_policy: fair\nfair_base_share: 0.5\n")
    assert resolve({"config": str(cfg)}, env={})[0].fair_base_share == 0.5
    env = {"WEIR_FAIR_BASE_SHARE": "3"}
    assert resolve({"config": str(cfg)}, env=env)[0].fair_base_share == 3.0
    assert resolve({"config": str(cfg), "fair_base_share": 2.0}, env=env)[0].fair_base_share == 2.0
    assert resolve({}, env={})[0].fair_base_share == 1.0
    with pytest.raises(ConfigError, match=r"fair_base_share must be a number in \(0, 1e6\]"):
        resolve({"fair_base_share": -1.0}, env={})


def test_the_server_resolves_its_engine_as_a_server_and_usage_is_no_option(tmp_path: Path) -> None:
    # The server's defaults (a 2048-token step budget on cuda) come from EngineConfig.usage, which the
    # server sets and no flag, variable or YAML key can.
    assert resolve({}, env={})[0].usage == "server"
    assert "usage" not in {o.name for o in all_options()}
    cfg = tmp_path / "c.yaml"
    cfg.write_text("usage: offline\n")
    with pytest.raises(ConfigError, match="usage"):
        resolve({"config": str(cfg)}, env={})


def test_tp_broadcast_ring_from_flag_env_and_yaml(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tp_broadcast_slots: 8\ntp-broadcast-slot-bytes: 65536\n")
    engine, _ = resolve({"config": str(cfg)}, env={})
    assert (engine.tp_broadcast_slots, engine.tp_broadcast_slot_bytes) == (8, 65536)
    engine, _ = resolve({"config": str(cfg)}, env={"WEIR_TP_BROADCAST_SLOT_BYTES": "1_048_576"})
    assert (engine.tp_broadcast_slots, engine.tp_broadcast_slot_bytes) == (8, 1 << 20)
    args = vars(build_parser().parse_args(["serve", "--tp-broadcast-slots", "32"]))
    engine, _ = resolve(args, env={"WEIR_TP_BROADCAST_SLOTS": "2"})
    assert engine.tp_broadcast_slots == 32
    with pytest.raises(
        ConfigError,
        match=r"^invalid tp_broadcast_slot_bytes \(from WEIR_TP_BROADCAST_SLOT_BYTES\): "
        r"tp_broadcast_slot_bytes must be a positive integer; got 0$",
    ):
        resolve({}, env={"WEIR_TP_BROADCAST_SLOT_BYTES": "0"})
