"""What ``rnnserve serve`` checks before it loads a model, so that an impossible setting fails in a
second with one line instead of after the load (or, worse, on every request).

- ``--device cuda`` needs a torch built with CUDA and a visible GPU;
- ``--kernels triton`` needs the triton package and a CUDA device (the kernels run on NVIDIA GPUs;
  on the CPU only Triton's interpreter runs them, with ``TRITON_INTERPRET=1``, which the tests use);
- the listening address must be free: the socket is bound here and handed to uvicorn, so nothing
  else can take the port while the model loads.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import socket

from rnnserve.config import ConfigError, ModelConfig, ServerConfig


def check_device(cfg: ModelConfig) -> None:
    """Raise ConfigError, naming the flag, when ``--device`` / ``--kernels`` cannot run here."""
    import torch

    device = cfg.device
    if device != "auto":
        try:
            torch.device(device)
        except RuntimeError as exc:
            raise ConfigError(f"--device {device!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from exc
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if device.startswith("cuda"):
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            raise ConfigError(
                f"--device {device}: this torch ({torch.__version__}) is built without CUDA; "
                "install a CUDA build of torch, or use --device cpu"
            )
        if not torch.cuda.is_available():
            raise ConfigError(
                f"--device {device}: no CUDA device is visible (no GPU, no driver, or CUDA_VISIBLE_DEVICES "
                "hides it); use --device cpu"
            )
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA device(s)")
    if cfg.kernels == "triton":
        if importlib.util.find_spec("triton") is None:
            raise ConfigError("--kernels triton needs the triton package (pip install triton); or use --kernels torch")
        if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(
                "--kernels triton needs a CUDA device (the Triton kernels run on NVIDIA GPUs) and this run is on "
                "the CPU; use --kernels torch (or auto, the default)"
            )


def bind_socket(cfg: ServerConfig) -> socket.socket:
    """The server's listening socket, bound now (uvicorn listens on it once the model is loaded).
    Raises ConfigError when the address is taken or cannot be used."""
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As uvicorn does: a port in TIME_WAIT after a restart is free to take, a listening one is not.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"--port {cfg.port}: {cfg.host}:{cfg.port} is already in use (another server?); stop it or "
                "pass another --port"
            ) from exc
        raise ConfigError(f"--host {cfg.host} --port {cfg.port}: cannot listen there ({exc.strerror or exc})") from exc
    sock.set_inheritable(True)
    return sock
