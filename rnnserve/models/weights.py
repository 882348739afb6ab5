"""One weight loader: a per-family name map and per-parameter load hooks (as vLLM's
``AutoWeightsLoader`` / ``WeightsMapper`` / ``weight_loader``).

A family describes how checkpoint names become its parameter names (``WeightsMapper``: prefix and
substring renames, names to ignore) and, for the few parameters that need more than a copy, attaches
a hook with ``set_weight_loader``: a transpose, a split of a fused tensor, or an exact fp32 copy kept
beside the parameter before any dtype cast. Checkpoints that store one tensor per slice of a stacked
parameter (one per expert of an ``[E, ...]`` expert weight, as vLLM's ``expert_params_mapping``) name
those slices with a ``ShardRule`` and fill them through a shard hook (``set_shard_loader``).
``load_weights`` then does the rest the same way for every family: unknown names and wrong shapes are
clear errors, the filled names are returned for the loader's missing-weights check (a stacked
parameter counts as filled once all of its shards arrived, from however many files).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

# hook(param, checkpoint_tensor): fill ``param`` (and whatever derives from the tensor).
WeightLoader = Callable[[nn.Parameter, torch.Tensor], None]
# shard_hook(param, checkpoint_tensor, shard): fill the slice of ``param`` that ``shard`` (the named
# groups of the ShardRule's match, e.g. {"expert": "3", "proj": "gate"}) names.
ShardLoader = Callable[[nn.Parameter, torch.Tensor, dict[str, str]], None]


@dataclass(frozen=True)
class ShardRule:
    """Checkpoint tensors that each fill one slice of a stacked parameter: a mapped name that
    ``pattern`` (a regex with named groups) matches in full goes to the parameter named
    ``match.expand(target)``, through that parameter's shard hook, with the match's named groups."""

    pattern: str
    target: str


@dataclass(frozen=True)
class WeightsMapper:
    """Checkpoint name -> parameter name. Applied in order: ``ignore_prefixes`` (checkpoint names)
    drops a tensor, ``prefixes`` replace a leading part, ``ignore_suffixes`` (exact names or suffixes
    after the prefix renames) drops a tensor, ``substrings`` replace every occurrence."""

    prefixes: tuple[tuple[str, str], ...] = ()
    substrings: tuple[tuple[str, str], ...] = ()
    ignore_suffixes: tuple[str, ...] = ()
    shards: tuple[ShardRule, ...] = ()
    ignore_prefixes: tuple[str, ...] = ()

    def map(self, name: str) -> str | None:
        if self.ignore_prefixes and name.startswith(self.ignore_prefixes):
            return None
        for old, new in self.prefixes:
            if name.startswith(old):
                name = new + name[len(old) :]
                break
        if self.ignore_suffixes and name.endswith(self.ignore_suffixes):
            return None
        for old, new in self.substrings:
            name = name.replace(old, new)
        return name

    def shard(self, name: str) -> tuple[str, dict[str, str]] | None:
        """(stacked parameter name, shard) for a mapped name that a shard rule matches, else None."""
        for rule in self.shards:
            match = re.fullmatch(rule.pattern, name)
            if match:
                return match.expand(rule.target), match.groupdict()
        return None


@torch.no_grad()
def default_weight_loader(param: nn.Parameter, tensor: torch.Tensor) -> None:
    if param.shape != tensor.shape:
        raise ValueError(f"checkpoint shape {tuple(tensor.shape)} != parameter shape {tuple(param.shape)}")
    param.copy_(tensor)


@torch.no_grad()
def reshape_weight_loader(param: nn.Parameter, tensor: torch.Tensor) -> None:
    """A checkpoint tensor with the parameter's number of elements in another shape (RWKV's lerp
    weights stored ``[1, 1, D]`` for a ``[D]`` parameter) is copied reshaped."""
    if tensor.shape != param.shape and tensor.numel() == param.numel():
        tensor = tensor.reshape(param.shape)
    default_weight_loader(param, tensor)


@torch.no_grad()
def fp32_weight_loader(param: nn.Parameter, tensor: torch.Tensor) -> None:
    """Fill ``param`` and keep it in fp32 whatever the model dtype (a router that transformers keeps
    in fp32): the parameter's storage becomes an fp32 copy of the checkpoint tensor."""
    if param.shape != tensor.shape:
        raise ValueError(f"checkpoint shape {tuple(tensor.shape)} != parameter shape {tuple(param.shape)}")
    param.data = torch.empty(param.shape, dtype=torch.float32, device=param.device).copy_(tensor)


def fp32_copy_loader(
    owner: nn.Module, attr: str, transform: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> WeightLoader:
    """A load hook that fills the parameter as usual and also sets ``owner.<attr>`` to an fp32 copy of
    the checkpoint tensor (optionally transformed, e.g. A = -exp(A_log)), whatever the model dtype:
    the recurrence reads these fp32 values, and rounding them to bf16 first would change its decay."""

    def loader(param: nn.Parameter, tensor: torch.Tensor) -> None:
        default_weight_loader(param, tensor)
        value = tensor.to(param.device, torch.float32)
        setattr(owner, attr, transform(value) if transform is not None else value)

    return loader


def set_weight_loader(param: nn.Parameter, loader: WeightLoader) -> None:
    """Attach a load hook to one parameter (used instead of the plain copy). Attach hooks in the
    family's ``load_weights``, not its constructor: materialising a meta-device module makes new
    parameter objects."""
    param.weight_loader = loader  # type: ignore[attr-defined]


def set_shard_loader(param: nn.Parameter, loader: ShardLoader, num_shards: int) -> None:
    """Attach a shard hook to a stacked parameter that ``num_shards`` checkpoint tensors fill (e.g.
    2E for gate and up rows of E experts). Attach in ``load_weights``, as ``set_weight_loader``."""
    param.shard_loader = loader  # type: ignore[attr-defined]
    param.num_shards = num_shards  # type: ignore[attr-defined]
    param.shards_loaded = set()  # type: ignore[attr-defined]


@torch.no_grad()
def load_weights(module: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], mapper: WeightsMapper) -> set[str]:
    """Fill ``module``'s parameters from (checkpoint name, tensor) pairs; the parameter names filled.

    Tied parameters appear once in ``named_parameters``: a family with a tied head ignores the head's
    checkpoint name in its mapper."""
    params = dict(module.named_parameters())
    filled: set[str] = set()
    for ckpt_name, tensor in weights:
        name = mapper.map(ckpt_name)
        if name is None:
            continue
        sharded = mapper.shard(name)
        shard: dict[str, str] | None = None
        if sharded is not None:
            name, shard = sharded
        param = params.get(name)
        if param is None or (shard is not None and not hasattr(param, "shard_loader")):
            raise KeyError(f"unexpected checkpoint tensor {ckpt_name!r} (no parameter {name!r})")
        try:
            if shard is None:
                loader: WeightLoader = getattr(param, "weight_loader", default_weight_loader)
                loader(param, tensor)
            else:
                param.shard_loader(param, tensor, shard)
        except ValueError as exc:
            raise ValueError(f"{ckpt_name}: {exc}") from exc
        if shard is not None:
            param.shards_loaded.add(tuple(sorted(shard.items())))
            if len(param.shards_loaded) < param.num_shards:
                continue  # filled once every shard has arrived
        filled.add(name)
    return filled
