"""The sampling a request gets for the fields it leaves out.

OpenAI's defaults (temperature 1, no top-k / top-p / min-p cut, no repetition penalty), except
where the model folder's ``generation_config.json`` sets ``temperature``, ``top_k``, ``top_p``,
``min_p`` or ``repetition_penalty``: those are the model's own recommendation and become the
defaults, as vLLM's ``--generation-config auto`` does. A request that sends a field always wins.
A file that cannot be read or sets a value out of range fails the start (``ModelLoadError``), as a
broken config.json does, rather than every request later.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields, replace
from pathlib import Path

from rnnserve.engine.request import SamplingParams, SamplingParamsError
from rnnserve.models.loader import ModelLoadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingDefaults:
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    @classmethod
    def from_model_folder(cls, folder: str | Path) -> SamplingDefaults:
        """OpenAI's defaults with the fields ``folder/generation_config.json`` sets; OpenAI's alone
        when the folder has none (or the model is a single file)."""
        path = Path(folder) / "generation_config.json"
        if not path.is_file():
            return cls()
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{path} is not valid JSON: {exc}") from exc
        if not isinstance(config, dict):
            raise ModelLoadError(f"{path} is not a JSON object")
        found = {}
        for f in fields(cls):
            value = config.get(f.name)
            if value is None:
                continue
            kind = int if f.type in ("int", int) else float
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise ModelLoadError(f"{path}: {f.name} must be a number, not {value!r}")
            found[f.name] = kind(value)
        defaults = replace(cls(), **found)
        try:
            SamplingParams(max_tokens=1, **{f.name: getattr(defaults, f.name) for f in fields(cls)})
        except SamplingParamsError as exc:
            raise ModelLoadError(f"{path}: {exc}") from exc
        if found:
            settings = ", ".join(f"{k}={v}" for k, v in found.items())
            logger.info("sampling defaults from the model's generation_config.json: %s", settings)
        return defaults
