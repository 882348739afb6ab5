"""Load a checkpoint: an HF folder (config.json + safetensors or .bin), a bare ``.pth`` file, or a
Hugging Face Hub id (fetched with huggingface_hub when the machine is online)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from rnnserve.config import ModelConfig
from rnnserve.kernels.dispatch import resolve_backend
from rnnserve.models import registry
from rnnserve.models.base import RecurrentLM

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """The checkpoint could not be found or read."""


@dataclass
class LoadedModel:
    model: RecurrentLM
    path: Path  # folder holding the checkpoint (and usually the tokenizer)
    hf_config: dict
    eos_token_id: int | None
    max_model_len: int | None  # the family's own limit (None for recurrent models)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {', '.join(_DTYPES)} or auto")
    return _DTYPES[dtype]


def resolve_model_path(model: str) -> Path:
    """A local folder or file as is; anything else is taken for a Hub id and downloaded."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ModelLoadError(f"model path {model!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.pth", "*.bin"]
            )
        )
    except Exception as exc:  # offline, unknown id, gated repo...
        raise ModelLoadError(
            f"{model!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}). Download it elsewhere and pass the folder with --model."
        ) from exc


def _checkpoint_files(folder: Path) -> list[Path]:
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.bin", "*.pth", "*.pt"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise ModelLoadError(f"no weights (*.safetensors, *.bin, *.pth) in {folder}")


def iter_checkpoint_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Every (name, tensor) of the checkpoint files, one file at a time."""
    for file in files:
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name)
        else:
            state_dict = torch.load(str(file), map_location="cpu", weights_only=True)
            yield from state_dict.items()


def _read_config_file(path: Path) -> dict | None:
    """The folder's config.json (a bare file's neighbour), None when there is none. Read before the
    weights are looked for: a broken config is the first thing to report."""
    config_file = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not config_file.exists():
        return None
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_file} is not valid JSON: {exc}") from exc


def _read_config(path: Path, files: list[Path], config: dict | None) -> dict:
    if config is not None:
        return config
    if len(files) == 1 and files[0].suffix in (".pth", ".pt"):
        state_dict = torch.load(str(files[0]), map_location="cpu", weights_only=True)
        return registry.config_from_state_dict(state_dict)
    raise ModelLoadError(f"no config.json in {path}")


def materialize(model: RecurrentLM, device: torch.device) -> RecurrentLM:
    """Give a module built on the meta device uninitialised storage on ``device``, keeping tied
    parameters tied. The checkpoint fills every parameter and ``post_load`` rebuilds derived buffers,
    so a random init would only cost time (about a second per 100M parameters on this CPU)."""
    tied: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    model = model.to_empty(device=device)
    for first, *others in tied.values():  # to_empty gives each name its own tensor
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, model.get_parameter(first))
    return model


def load_model(cfg: ModelConfig) -> LoadedModel:
    """Build the family's module from the checkpoint's config and fill it with the weights."""
    if cfg.model is None:
        raise ModelLoadError("no model given")
    path = resolve_model_path(cfg.model)
    config = _read_config_file(path)
    files = [path] if path.is_file() else _checkpoint_files(path)
    hf_config = _read_config(path, files, config)
    cls = registry.resolve_class(hf_config)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    backend = resolve_backend(cfg.kernels, device)

    try:
        with torch.device("meta"):
            model = cls.from_hf_config(hf_config, backend=backend)
    except (KeyError, ValueError, TypeError) as exc:  # a config key missing or out of range
        raise ModelLoadError(f"{path}: not a valid {cls.__name__} config ({type(exc).__name__}: {exc})") from exc
    model = materialize(model.to(dtype), device)
    expected = {name for name, _ in model.named_parameters()}
    total = sum(os.path.getsize(f) for f in files)
    filled: set[str] = set()
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"Loading {path.name}", leave=False) as bar:
        for file in files:
            try:
                filled |= model.load_weights(iter_checkpoint_tensors([file]))
            except (KeyError, ValueError) as exc:  # a tensor the family does not know, or a wrong shape
                raise ModelLoadError(f"{file} does not fit {cls.__name__}: {exc}") from exc
            bar.update(os.path.getsize(file))
    missing = expected - filled
    if missing:
        raise ModelLoadError(f"checkpoint {path} lacks weights for: {', '.join(sorted(missing)[:10])}")
    model.post_load()
    if cfg.quantization == "int8":
        if device.type != "cpu" or dtype != torch.float32:
            raise ModelLoadError(f"--quantization int8 runs on the CPU in float32 only (got {device}, {dtype})")
        try:
            model.quantize_int8()
        except NotImplementedError as exc:
            raise ModelLoadError(str(exc)) from exc
    model.eval()
    folder = path if path.is_dir() else path.parent
    logger.info("loaded %s (%s) on %s as %s, %s kernels", path, cls.__name__, device, dtype, backend)
    return LoadedModel(
        model=model,
        path=folder,
        hf_config=hf_config,
        eos_token_id=_eos_token_id(hf_config),
        max_model_len=getattr(model, "max_model_len", None),
    )


def _eos_token_id(hf_config: dict) -> int | None:
    eos = hf_config.get("eos_token_id")
    if isinstance(eos, list):
        return eos[0] if eos else None
    return eos
