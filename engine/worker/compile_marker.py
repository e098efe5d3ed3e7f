"""Whether this start-up's Triton kernels are already in the Triton cache, so the compile pool is used
only where it saves time.

The pool (compile_pool.py, compile_ahead.py) helps on an empty cache and costs on a warm one: on an
H100 (Llama-3-8B shape, 2026-12-06) a warm-cache start took 9.35 s with 8 workers against 6.95 s
without (its dry forwards 0.94 s, then 1.3 s waiting on workers still starting up to find every kernel
in the cache), while on an empty cache it took U1 from 13.1 to 11.3-11.6 s (2026-12-05). Triton cannot
say which kernels a forward will launch before it runs, so the runner remembers instead: once a
start-up has captured its CUDA graphs, every kernel it launched is in the cache, and it leaves a
marker there named by what decides those kernels (Triton's version, the kernels' sources, the GPU's
compute capability, the resolved config, the WEIR_ switches). A start-up that finds its marker ends
the pool's workers at once and compiles nothing ahead.

Nothing depends on it for correctness: a wrong miss costs what the pool costs; a wrong hit (the
kernels gone but the marker kept, unlikely since it lives in the same directory) costs the in-process
compiles a start without the pool pays.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

OPS_TRITON = Path(__file__).resolve().parents[2] / "ops" / "triton"
# The switches that do not change which kernels a start-up launches
_NOT_IN_KEY = frozenset({"WEIR_COMPILE_WORKERS", "WEIR_COMMIT"})


def startup_key(config: object, capability: tuple[int, int]) -> str:
    """A hex digest of what decides a start-up's Triton kernels. `config`: the resolved engine config
    (its repr is hashed), `capability`: the GPU's (major, minor)."""
    digest = hashlib.sha256()
    try:
        triton_version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton_version = "none"
    digest.update(f"triton {triton_version}; sm {capability}\n".encode())
    for source in sorted(OPS_TRITON.glob("*.py")):
        digest.update(source.name.encode() + b"\n" + source.read_bytes())
    switches = sorted((k, v) for k, v in os.environ.items() if k.startswith("WEIR_") and k not in _NOT_IN_KEY)
    digest.update(repr(switches).encode() + b"\n" + repr(config).encode())
    return digest.hexdigest()[:32]


def marker_path(key: str) -> Path:
    """Where a start-up's marker lives: in Triton's cache directory (TRITON_CACHE_DIR, else
    $TRITON_HOME/.triton/cache, TRITON_HOME defaulting to the home directory)."""
    try:
        from triton import knobs  # noqa: PLC0415 (the runner has imported triton by now)

        cache_dir = Path(knobs.cache.dir)
    except (ImportError, AttributeError):  # a Triton without knobs: its documented default
        home = os.environ.get("TRITON_HOME") or str(Path.home())
        cache_dir = Path(os.environ.get("TRITON_CACHE_DIR") or Path(home) / ".triton" / "cache")
    return cache_dir / "weir-startups" / key


def compiled_before(key: str) -> bool:
    return marker_path(key).is_file()


def mark_compiled(key: str) -> None:
    """Leave the marker; a cache directory that cannot be written only costs the next start the pool."""
    path = marker_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("a weir start-up with this key captured its CUDA graphs against this cache\n")
    except OSError:
        pass
