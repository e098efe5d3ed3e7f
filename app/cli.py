"""`weir serve [MODEL_DIR] [--config FILE] [options]`: the OpenAI-compatible server;
`weir bench latency|throughput|serve ...`: the benchmarks (app/bench_cli.py).

Every option is also an environment variable (WEIR_<OPTION>) and a YAML key; see app/config.py for
the precedence. The engine's options are generated from `EngineConfig`'s fields.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from app import __version__
from app.config import ENV_PREFIX, ConfigError, Option, all_options, default_model_dir, resolve
from engine.startup_phases import StartupPhases, process_start


def _help(opt: Option) -> str:
    default = opt.default
    if opt.is_list:
        shown = "none" if not default else ",".join(default)
    elif default is None:
        shown = "auto"
    else:
        shown = str(default)
    text = f"{opt.help} [default: {shown}; env: {opt.env}]"
    return text.replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weir", description="weir: an LLM inference and serving engine.")
    parser.add_argument("--version", action="version", version=f"weir {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    serve = sub.add_parser(
        "serve",
        help="Serve a model over an OpenAI-compatible HTTP API.",
        description=(
            "Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
            "/v1/models, /health, /metrics, /version, /tokenize, /detokenize). Precedence of settings: "
            f"flags, then environment ({ENV_PREFIX}<OPTION>, e.g. {ENV_PREFIX}PORT; lists comma-separated), "
            "then the --config YAML file, then defaults. SIGTERM drains: new requests get 503 while "
            "in-flight ones finish for up to --shutdown-timeout seconds; then the process exits 0."
        ),
    )
    serve.add_argument(
        "model",
        nargs="?",
        default=argparse.SUPPRESS,
        metavar="MODEL_DIR",
        help=f"Model directory (a Hugging Face checkpoint). Default: the embedded model at {default_model_dir()}. "
        f"[env: {ENV_PREFIX}MODEL]",
    )
    serve.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help=f"YAML file of options (keys as the option names, e.g. max_num_seqs). [env: {ENV_PREFIX}CONFIG]",
    )
    bench = sub.add_parser(
        "bench",
        help="Benchmark: latency, throughput (offline) or serve (any OpenAI-compatible server), as `vllm bench`.",
        add_help=False,
    )
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="see `weir bench --help`")
    groups = {
        "server": serve.add_argument_group("server options"),
        "engine": serve.add_argument_group("engine options"),
    }
    for opt in all_options():
        if opt.name == "model":
            continue
        kwargs: dict = {"dest": opt.name, "default": argparse.SUPPRESS, "help": _help(opt)}
        if opt.base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif opt.is_list:
            kwargs["action"] = "append"
            kwargs["metavar"] = opt.name.upper()
        else:
            kwargs["metavar"] = {int: "INT", float: "FLOAT"}.get(opt.base, opt.name.upper())
        groups[opt.target].add_argument(opt.flag, **kwargs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Everything before this line (the interpreter, weir's first imports) is start-up's imports.
    startup = StartupPhases(process_start())
    startup.add("imports", time.perf_counter() - startup.origin)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its subcommands parse their own flags (app/bench_cli.py)
        from app.bench_cli import main as bench_main

        return bench_main(argv[1:])
    with startup.phase("config"):
        args = build_parser().parse_args(argv)
    if args.command == "serve":
        return serve(vars(args), startup)
    return 2  # pragma: no cover - argparse rejects unknown commands


def serve(flags: dict, startup: StartupPhases | None = None) -> int:
    """`startup`: the recorder of start-up's phases, to which the engine and the server add theirs.

    The cyclic garbage collector is off during start-up: torch, transformers and the model make
    millions of objects that live as long as the process, and each automatic full collection walked
    all of them again (seconds, all told). The server collects once when it starts serving
    (app.runner.freeze_startup_objects), which turns the collector back on.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _serve(flags, startup or StartupPhases())
    finally:
        compile_pool = sys.modules.get("engine.worker.compile_pool")
        if compile_pool is not None:  # an error before the engine's graphs: its workers end now
            compile_pool.stop(terminate=True)
        if gc_was_enabled:
            gc.enable()  # where start-up stopped before serving (an in-process caller's collector)


def _serve(flags: dict, startup: StartupPhases) -> int:
    flags = {k: v for k, v in flags.items() if k != "command"}
    config_phase = startup.begin("config")
    try:
        engine_config, server_config = resolve(flags)
    except ConfigError as exc:
        print(f"weir serve: error: {exc}", file=sys.stderr)
        return 2
    if not Path(engine_config.model).is_dir():
        print(f"weir serve: error: model directory {engine_config.model!r} does not exist", file=sys.stderr)
        return 2
    for name, path in server_config.lora_adapters:
        if not Path(path).is_dir():
            print(
                f"weir serve: error: lora_modules: the directory {path!r} of adapter {name!r} does not exist",
                file=sys.stderr,
            )
            return 2

    from engine.gc_tuning import gen0_threshold
    from engine.worker import compile_pool
    from ops.env_flags import check_env_flags

    try:
        check_env_flags()  # the tuning switches (WEIR_PDL, ...): 0 or 1, refused here before anything loads
        # Read once serving starts (app/runner.py): a bad value there came after the model loaded,
        # as a traceback and exit 1.
        gen0_threshold()
    except ValueError as exc:
        print(f"weir serve: error: {exc}", file=sys.stderr)
        return 2
    if compile_pool.gpu_likely(engine_config.device) and engine_config.tensor_parallel_size == 1:
        # Start-up's Triton compiles in worker processes (WEIR_COMPILE_WORKERS; engine/worker/
        # compile_pool.py): spawned first, they import torch and triton while this process does.
        try:
            compile_pool.start(compile_pool.workers_from_env(default=compile_pool.SERVE_DEFAULT_WORKERS))
        except ValueError as exc:
            print(f"weir serve: error: {exc}", file=sys.stderr)
            return 2

    with startup.phase("imports"):
        from app.port_file import prepare_port_file
        from app.startup import device_problem, port_problem

        if engine_config.device == "cuda":
            import torch  # noqa: F401 - device_problem's first use: an import, not a check

    problem = (
        device_problem(engine_config)
        or port_problem(server_config)
        or prepare_port_file(server_config.port_file)
    )
    startup.end(config_phase)
    if problem:
        print(f"weir serve: error: {problem}", file=sys.stderr)
        return 2

    with startup.phase("imports"):
        from app.logging import configure_logging, get_logger

    configure_logging(server_config.log_level, server_config.log_json)
    log = get_logger("weir.cli")
    log.info(
        "loading model", model=engine_config.model, device=engine_config.device, dtype=engine_config.dtype
    )
    with startup.phase("imports"):
        from engine.async_engine import AsyncEngine

    try:
        engine = AsyncEngine(engine_config, startup_phases=startup)
    except Exception as exc:
        # One line a user can act on; the traceback only when asked for (a bug, not a setting).
        if server_config.log_level == "debug":
            log.exception("cannot load the model")
        detail = str(exc) if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {exc}"
        print(f"weir serve: error: cannot load the model: {detail}", file=sys.stderr)
        return 1

    with startup.phase("imports"):
        from app.runner import run_server
        from app.server import build_app  # noqa: F401 - run_server's, imported here to count as imports

    server = run_server(engine, server_config)
    if server.state.startup_error is not None:
        print(f"weir serve: error: {server.state.startup_error}", file=sys.stderr)
        return 1
    if server.force_exit:
        # A second signal: the engine's worker may still be mid-step; do not wait for it.
        log.warning("forced exit")
        sys.stderr.flush()
        os._exit(1)
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
