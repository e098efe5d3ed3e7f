"""`weir serve` settings: the server's own options plus every `EngineConfig` field.

Precedence, highest first: command-line flags, environment (`WEIR_<FIELD>`, e.g. WEIR_PORT,
WEIR_MAX_NUM_SEQS; list options comma-separated), the YAML file given by --config (or WEIR_CONFIG),
then the dataclass defaults. Flags and env names are generated from the dataclass fields, so a new
engine field is a new flag without touching this file. A bad value or an unknown YAML key fails at
start with a message that names the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.lora_config import (
    LoRASectionError,
    check_lora_settings,
    expand_section,
    parse_lora_modules,
    parse_lora_shares,
)
from engine.config import EngineConfig

ENV_PREFIX = "WEIR_"


class ConfigError(ValueError):
    """A setting is unknown or invalid; the message names it and its source."""


@dataclass(slots=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 8000
    port_file: str | None = None
    api_key: list[str] = field(default_factory=list)
    served_model_name: list[str] = field(default_factory=list)
    shutdown_timeout: float = 30.0
    max_body_bytes: int = 8 * 1024 * 1024
    max_header_bytes: int = 64 * 1024
    max_header_count: int = 256
    header_timeout: float = 10.0
    allowed_origins: list[str] = field(default_factory=list)
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    allow_special_tokens_in_content: bool = False
    sse_keepalive: float = 15.0
    gil_switch_interval: float = 0.001
    log_level: str = "info"
    log_json: bool = True
    # Multi-LoRA: adapters served at start (NAME=PATH; YAML lora.adapters), and whether
    # /v1/load_lora_adapter and /v1/unload_lora_adapter are on.
    lora_modules: list[str] = field(default_factory=list)
    # NAME=SHARE: an adapter's share under scheduling_policy "fair" (YAML: an adapter entry's `share`).
    lora_shares: list[str] = field(default_factory=list)
    allow_runtime_lora_updating: bool = False

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535]; got {self.port}")
        if any(not k for k in self.api_key):
            raise ValueError("api_key must not be empty")
        if any(not n for n in self.served_model_name):
            raise ValueError("served_model_name must not be empty")
        # `not x >= 0`: NaN fails every comparison, so `x < 0` let it through (a NaN timeout).
        if not self.shutdown_timeout >= 0:
            raise ValueError(f"shutdown_timeout must be >= 0; got {self.shutdown_timeout}")
        if self.max_body_bytes <= 0:
            raise ValueError(f"max_body_bytes must be > 0; got {self.max_body_bytes}")
        if self.max_header_bytes <= 0:
            raise ValueError(f"max_header_bytes must be > 0; got {self.max_header_bytes}")
        if self.max_header_count <= 0:
            raise ValueError(f"max_header_count must be > 0; got {self.max_header_count}")
        if not self.header_timeout > 0:
            raise ValueError(f"header_timeout must be > 0; got {self.header_timeout}")
        if not self.sse_keepalive > 0:
            raise ValueError(f"sse_keepalive must be > 0; got {self.sse_keepalive}")
        if not 0 < self.gil_switch_interval <= 1:
            raise ValueError(f"gil_switch_interval must be in (0, 1] seconds; got {self.gil_switch_interval}")
        if self.log_level.lower() not in ("debug", "info", "warning", "error", "critical"):
            raise ValueError(
                f"log_level must be one of debug, info, warning, error, critical; got {self.log_level!r}"
            )
        self.log_level = self.log_level.lower()
        adapters = parse_lora_modules(self.lora_modules)
        parse_lora_shares(self.lora_shares, [name for name, _ in adapters])

    @property
    def lora_adapters(self) -> list[tuple[str, str]]:
        """`lora_modules` as (name, path) pairs, in the order given."""
        return parse_lora_modules(self.lora_modules)

    @property
    def lora_share_map(self) -> dict[str, float]:
        """`lora_shares` as {adapter name: share} (adapters not named there have share 1)."""
        return parse_lora_shares(self.lora_shares, [name for name, _ in self.lora_adapters])


SERVER_HELP: dict[str, str] = {
    "host": "Address to listen on.",
    "port": "TCP port to listen on (0: any free port, logged at start).",
    "port_file": "Write the port the server listens on to this file (the number and a newline) once it "
    "serves, and remove the file at exit; with --port 0, how a supervisor or a test learns the port the "
    "kernel picked. An old file there is removed at start. None (default): no file.",
    "api_key": "API key clients must send as 'Authorization: Bearer KEY'. Repeat for several keys "
    "(env: comma-separated; an empty entry is refused). None: no authentication. /health, /metrics and "
    "/openapi.json stay open.",
    "served_model_name": "Model name(s) clients use in the 'model' field; repeatable. "
    "Default: the model directory's name.",
    "shutdown_timeout": "Seconds in-flight requests may keep running after SIGTERM before they are aborted.",
    "max_body_bytes": "Largest request body accepted, in bytes (413 beyond).",
    "max_header_bytes": "Largest request line + header block accepted, in bytes (431 beyond; the connection "
    "is closed).",
    "max_header_count": "Most header fields in one request (431 beyond).",
    "header_timeout": "Seconds a client has, from connecting or from the first byte of a request, to send "
    "the whole request line and headers; a connection still sending them then gets 408 and is closed.",
    "allowed_origins": "CORS: origins browsers may call from (e.g. https://app.example.com, or *). "
    "Repeatable. None (default): CORS is off and no CORS headers are sent.",
    "allowed_methods": "CORS: methods allowed from those origins (only with --allowed-origins).",
    "allowed_headers": "CORS: request headers allowed from those origins (only with --allowed-origins).",
    "allow_credentials": "CORS: let browsers send cookies and Authorization (only with --allowed-origins).",
    "allow_special_tokens_in_content": "Tokenize special-token text inside chat message content (e.g. "
    "'<|im_end|>') into the model's control tokens, as vLLM does. Off (default): it is plain text, so a "
    "user cannot forge turns; turn on only when every caller is trusted.",
    "sse_keepalive": "Seconds between keep-alive comments on an idle stream (e.g. while queued).",
    "gil_switch_interval": "Python's thread switch interval (sys.setswitchinterval), in seconds, set "
    "once at start. Below Python's 5 ms, so the engine's worker thread gets the GIL back sooner after "
    "each GPU wait while the event loop is busy streaming.",
    "log_level": "debug, info, warning, error or critical.",
    "log_json": "JSON log lines (default) or, with --no-log-json, plain console lines.",
    "lora_modules": "LoRA adapter to serve, as NAME=PATH (a PEFT adapter directory); repeatable (env: "
    "comma-separated). A request's 'model' set to NAME runs with that adapter. Needs --enable-lora.",
    "lora_shares": "An adapter's share under --scheduling-policy fair, as NAME=SHARE (a number in (0, 1e6]; "
    "default 1, the base model's): an adapter of share 2 is served about twice as much as one of share 1 "
    "while both have requests waiting. Repeatable (env: comma-separated); YAML: an adapter entry's 'share'.",
    "allow_runtime_lora_updating": "Turn on POST /v1/load_lora_adapter and /v1/unload_lora_adapter (behind "
    "the API key when keys are set). Needs --enable-lora.",
}

ENGINE_HELP: dict[str, str] = {
    "model": "Model directory (a Hugging Face checkpoint). Default: the embedded default model.",
    "tokenizer": "Tokenizer directory. Default: the model directory.",
    "dtype": "Weights and activations dtype: auto (bfloat16 on cuda, float32 on cpu), float32, float16, bfloat16.",
    "device": "auto (cuda when available), cpu or cuda.",
    "seed": "Seed of the engine's random generator (requests may pass their own seed).",
    "load_format": "auto, safetensors, or dummy (random weights, for benchmarks).",
    "max_model_len": "Context length: prompt + output tokens. Default: the model's max_position_embeddings "
    "(rope_scaling yarn: original_max_position_embeddings * factor, as vLLM).",
    "block_size": "Tokens per KV-cache block: 8, 16, 32 or 64.",
    "kv_cache_dtype": "KV-cache dtype: auto (the model dtype), fp8 (= fp8_e4m3) or fp8_e5m2: 1-byte K/V "
    "with per-tensor or per-KV-head scales from the checkpoint's k_scale/v_scale (1.0 without), twice the blocks of a "
    "bf16 cache in the same memory. fp8_e4m3 on CUDA needs compute capability 8.9+ (README: Quantization).",
    "quantization": "Weight quantization: gptq, awq, fp8, squeezellm or compressed-tensors, which must match the checkpoint's; fp8 on an "
    "unquantized checkpoint quantizes its weights at load. Default: what the checkpoint's config says "
    "(README: Quantization).",
    "num_kv_blocks": "KV-cache blocks to allocate. Default: from --gpu-memory-utilization or --cpu-kv-cache-gb.",
    "gpu_memory_utilization": "Fraction of GPU memory weir may use (weights + activations + KV cache), in (0, 1].",
    "cpu_kv_cache_gb": "KV-cache size on CPU, in GiB.",
    "max_num_seqs": "Most sequences in one batch. Default: 1024 on cuda, 256 on cpu.",
    "max_num_batched_tokens": "Token budget of one engine step. Default: 2048 on cuda (max(8192, max_model_len) "
    "offline, in LLM), 512 on cpu.",
    "enable_prefix_caching": "Reuse KV blocks of shared prompt prefixes.",
    "enforce_eager": "Run without CUDA graphs.",
    "async_scheduling": "Schedule and launch step N+1 while the GPU runs step N (off: one step at a time).",
    "max_cuda_graph_batch_size": "Largest decode batch captured in a CUDA graph. Default: 1024.",
    "max_cuda_graph_mixed_tokens": "Mixed prefill+decode steps of up to this many tokens replay CUDA "
    "graphs too (0: always eager). Default: 512 on cuda.",
    "long_prefill_token_threshold": "Most prompt tokens one request computes in one step (0: the step's whole "
    "budget). Lower (e.g. 512) to keep streams' inter-token latency low while long prompts arrive; their "
    "time to first token rises.",
    "admission_reserve_tokens": "KV blocks kept free at admission for each running request's next this-many "
    "tokens (fewer where its max_tokens ends sooner) and the rest of every admitted prompt, so running "
    "requests grow without preempting each other (0: admit whenever the next prompt chunk fits, vLLM's policy).",
    "fit_mixed_steps_to_cuda_graphs": "When decodes share a step with a prompt, cut the prompt's chunk so "
    "the step fits the largest mixed CUDA graph (--max-cuda-graph-mixed-tokens), instead of a larger step "
    "that runs eagerly; the prompt takes more steps. Only while the prompts' backlog is at most "
    "8,192 tokens or one full step (under a longer queue, steps take the whole budget). On by default; --no-fit-mixed-steps-to-cuda-graphs: "
    "lower time to first token, a higher inter-token latency tail.",
    "max_waiting_requests": "Waiting-queue bound in requests; beyond it new requests get 429.",
    "max_waiting_tokens": "Waiting-queue bound in prompt tokens; beyond it new requests get 429.",
    "max_best_of": "Most sequences a request with best_of > n may generate (OpenAI's limit, 20); above it "
    "the request gets a 400.",
    "max_beam_width": "Widest beam search a request may ask for (use_beam_search with n beams); above it "
    "the request gets a 400.",
    "beam_device_ranking": "Rank beam search candidates on the device: one forward pass per token for all "
    "beams, the host a step behind. On by default; --no-beam-device-ranking: every beam group waits for "
    "the host's ranking before its next step (groups with stop strings always do).",
    "enable_lora": "Serve LoRA adapters (README: Multi-LoRA); off: a request naming an adapter gets a 404.",
    "max_loras": "Most distinct adapters in one engine step (GPU slots of stacked adapter weights).",
    "max_lora_rank": "Highest adapter rank accepted; an adapter of a higher rank is refused at load.",
    "max_cpu_loras": "Adapters kept loaded in host memory (LRU). Default: max_loras.",
    "scheduling_policy": "fcfs (arrival order) or fair (waiting requests ordered by the service their adapter "
    "has received, a virtual token counter).",
    "fair_prompt_token_weight": "Under --scheduling-policy fair: what one computed prompt token adds to its "
    "adapter's counter (default 1).",
    "fair_output_token_weight": "Under --scheduling-policy fair: what one output token adds to its adapter's "
    "counter (default 2: a decode step costs more per token than a prefill).",
    "fair_base_share": "Under --scheduling-policy fair: the base model's share of the service (requests "
    "without an adapter), as --lora-shares gives an adapter's (default 1; in (0, 1e6]).",
    "tensor_parallel_size": "Shard the model over this many GPUs (or CPU processes with --device cpu), "
    "one worker process per rank (README: Tensor parallelism). It must divide the attention heads.",
    "distributed_executor_backend": "Where tensor-parallel workers run: mp (processes on this node) or "
    "ray (actors on a Ray cluster, pip install weir[ray]).",
    "tp_broadcast_slots": "Slots of the shared-memory ring that carries each step to the tensor-parallel worker "
    "processes (mp backend); the engine runs at most this many messages ahead of the slowest rank.",
    "tp_broadcast_slot_bytes": "Bytes of one slot of that ring (the ring takes slots x this in /dev/shm). A step's "
    "message larger than a slot goes down every worker's pipe instead (slower; logged once).",
}


def default_model_dir() -> str:
    """The checkpoint shipped inside the `engine` package."""
    return str(importlib.resources.files("engine") / "default_model")


# ---------------------------------------------------------------- fields and their types


@dataclass(frozen=True, slots=True)
class Option:
    name: str
    type: Any  # resolved annotation: int, float, bool, str, list[str], possibly | None
    default: Any
    help: str
    target: str  # "engine" or "server"

    @property
    def base(self) -> Any:
        return _strip_optional(self.type)[0]

    @property
    def optional(self) -> bool:
        return _strip_optional(self.type)[1]

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.base) is list

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _options_of(cls: type, target: str, help_text: Mapping[str, str]) -> list[Option]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.metadata.get("option") is False:
            continue  # set by the program, not by users (EngineConfig.usage)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        help_ = help_text.get(f.name) or f"EngineConfig.{f.name}."
        out.append(Option(f.name, hints[f.name], default, help_, target))
    return out


def all_options() -> list[Option]:
    return _options_of(ServerConfig, "server", SERVER_HELP) + _options_of(EngineConfig, "engine", ENGINE_HELP)


# ---------------------------------------------------------------- value conversion

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONE = {"none", "null", "auto", ""}
# List options whose empty entries are refused rather than dropped (an empty entry is a mistake there).
_NO_EMPTY_ENTRIES = {"api_key"}


def convert(opt: Option, raw: Any, source: str) -> Any:
    """A value from YAML (typed), env or a flag (strings) as the option's type; ConfigError otherwise."""

    def fail(expected: str) -> ConfigError:
        return ConfigError(f"{source}: expected {expected}; got {raw!r}")

    base = opt.base
    if raw is None or (opt.optional and isinstance(raw, str) and raw.strip().lower() in _NONE):
        if opt.optional:
            return None
        if opt.is_list:
            return []
        raise fail(_type_name(opt))
    if opt.is_list:
        items = raw.split(",") if isinstance(raw, str) else raw
        if not isinstance(items, list) or not all(isinstance(i, (str, int, float)) for i in items):
            raise fail("a list of strings")
        values = [str(i).strip() for i in items if str(i).strip()]
        if opt.name in _NO_EMPTY_ENTRIES and len(values) != len(items):
            # WEIR_API_KEY="," (or "", " , ", "--api-key ''") used to drop its empty entries and
            # leave no key: authentication silently off where the operator meant it on. The message
            # does not echo the value: it holds the keys.
            empty = [k for k, i in enumerate(items, 1) if not str(i).strip()]
            what = (
                "has no key, only empty entries"
                if not values
                else f"entry {empty[0]} of {len(items)} is empty"
            )
            raise ConfigError(
                f"{source} {what}; give one or more non-empty keys (comma-separated in the environment), "
                "or leave it unset for no authentication"
            )
        return values
    if base is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            return raw.strip().lower() in _TRUE
        raise fail("true or false")
    if base is int:
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.strip().replace("_", ""))
            except ValueError:
                pass
        raise fail("an integer")
    if base is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw.strip())
            except ValueError:
                pass
        raise fail("a number")
    if base is str:
        if isinstance(raw, (str, int, float)) and not isinstance(raw, bool):
            return str(raw)
        raise fail("a string")
    raise fail(_type_name(opt))  # a field type this loader does not know yet


def _type_name(opt: Option) -> str:
    base = opt.base
    if opt.is_list:
        return "a list of strings"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(base, str(base))


# ---------------------------------------------------------------- merging the sources


def load_yaml(path: str | Path, options: Mapping[str, Option]) -> dict[str, tuple[Any, str]]:
    import yaml

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must be a mapping of option names to values")
    out: dict[str, tuple[Any, str]] = {}
    for key, raw in data.items():
        name = str(key).replace("-", "_")
        source = f"key '{key}' in {p}"
        if name == "lora":  # the `lora:` section (app/lora_config.py): sugar over flat options
            try:
                section = expand_section(raw, str(p))
            except LoRASectionError as exc:
                raise ConfigError(str(exc)) from None
            for opt_name, (value, where) in section.items():
                if opt_name in out:
                    raise ConfigError(f"{where} sets {opt_name}, which {out[opt_name][1]} sets too")
                out[opt_name] = (convert(options[opt_name], value, where), where)
            continue
        if name not in options:
            raise ConfigError(
                f"unknown key '{key}' in {p}; known keys: {', '.join(sorted([*options, 'lora']))}"
            )
        if name in out:
            raise ConfigError(f"{source} sets {name}, which {out[name][1]} sets too")
        out[name] = (convert(options[name], raw, source), source)
    return out


def resolve(
    flags: Mapping[str, Any],
    env: Mapping[str, str] | None = None,
    config_path: str | None = None,
) -> tuple[EngineConfig, ServerConfig]:
    """Merge defaults < YAML < env < flags into validated configs. `flags` holds only what was given."""
    env = os.environ if env is None else env
    options = {o.name: o for o in all_options()}
    values: dict[str, tuple[Any, str]] = {}

    config_path = flags.get("config") or env.get(ENV_PREFIX + "CONFIG") or config_path
    if config_path:
        values.update(load_yaml(config_path, options))
    for name, opt in options.items():
        if opt.env in env:
            values[name] = (convert(opt, env[opt.env], f"environment variable {opt.env}"), opt.env)
    for name, raw in flags.items():
        if name in options and raw is not None:
            opt = options[name]
            values[name] = (convert(opt, raw, f"option {opt.flag}"), opt.flag)

    if "model" not in values:
        values["model"] = (default_model_dir(), "the default model")

    def build(cls: type, target: str) -> Any:
        kwargs = {n: v for n, (v, _) in values.items() if options[n].target == target}
        try:
            return cls(**kwargs)
        except ValueError as exc:
            message = str(exc)
            name = message.split(" ", 1)[0]
            where = values[name][1] if name in values else "its default"
            raise ConfigError(f"invalid {name} (from {where}): {message}") from exc

    server = build(ServerConfig, "server")
    engine = build(EngineConfig, "engine")
    engine.usage = "server"  # the server's defaults (EngineConfig.resolve: a smaller step budget)
    if not server.served_model_name:
        server.served_model_name = [Path(engine.model).name or "model"]
    problem = check_lora_settings(
        engine.enable_lora,
        server.lora_adapters,
        server.allow_runtime_lora_updating,
        server.served_model_name,
        {n: where for n, (_, where) in values.items()},
    )
    if problem:
        raise ConfigError(problem)
    if not engine.enable_lora:
        # Sizing LoRA without turning it on was silently ignored; a value equal to the default is
        # fine (config/default.yaml spells every default out).
        defaults = EngineConfig(model=engine.model)
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            if name in values and getattr(engine, name) != getattr(defaults, name):
                raise ConfigError(
                    f"{name} (from {values[name][1]}) needs enable_lora (--enable-lora, WEIR_ENABLE_LORA or "
                    "lora.enable in YAML); without it no adapter is served"
                )
    if not server.allowed_origins:
        # CORS is off without allowed origins (app/server.py adds no middleware), so these were
        # silently ignored; a value equal to the default is fine (config/default.yaml spells it out).
        server_defaults = ServerConfig()
        for name in ("allow_credentials", "allowed_methods", "allowed_headers"):
            if name in values and getattr(server, name) != getattr(server_defaults, name):
                raise ConfigError(
                    f"{name} (from {values[name][1]}) needs allowed_origins (--allowed-origins, "
                    "WEIR_ALLOWED_ORIGINS or allowed_origins in YAML); without it CORS is off and no CORS "
                    "header is sent"
                )
    return engine, server
