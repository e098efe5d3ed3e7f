"""Start-up misconfigurations found before the model is loaded, each as one line that says which
package to install or which flag to change (no traceback: the user can act on the line alone).
"""

from __future__ import annotations

import errno
import socket

from app.config import ServerConfig
from engine.config import EngineConfig


def device_problem(engine: EngineConfig) -> str | None:
    if engine.device != "cuda":
        return None
    import torch

    if torch.cuda.is_available():
        return None
    if torch.version.cuda is None:
        return (
            f"--device cuda, but this torch ({torch.__version__}) is a CPU-only build: install a CUDA "
            "build of torch (pip install torch --index-url https://download.pytorch.org/whl/cu124, or the "
            "index for your CUDA version), or pass --device cpu"
        )
    return (
        f"--device cuda, but torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU: check the "
        "NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES, or pass --device cpu"
    )


def port_problem(server: ServerConfig) -> str | None:
    """Whether --host/--port can be listened on, checked before minutes of model loading."""
    if server.port == 0:
        return None
    try:
        infos = socket.getaddrinfo(server.host, server.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"--host {server.host!r} is not an address of this machine ({exc.strerror}); pass e.g. --host 0.0.0.0"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"cannot listen on {server.host}:{server.port}: the address is in use; pass another --port"
            return f"cannot listen on {server.host}:{server.port}: {exc.strerror}; check --host and --port"
    return None
