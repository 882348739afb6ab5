"""The interface every model family implements.

A family declares the recurrent state each layer keeps per sequence (``StateSpec``) and implements
two named calls over packed batches:

- ``prefill(batch, states)``: any number of tokens per sequence, packed variable-length
  (``cu_seqlens``, no padding), each sequence starting from the state in its slot (zero for a fresh
  request, or whatever an earlier chunk or a restored snapshot left there). Writes each sequence's
  final state back to its slot, in place.
- ``decode(batch, states)``: exactly one token per sequence, a single recurrent step per layer, in
  place by slot index. This is the call that is captured as a CUDA graph on a GPU, so it must not
  synchronise with the host, allocate data-dependent shapes, or branch on tensor values.

A step with both is ``mixed(batch, states)``: by default the two calls one after the other; Mamba and
Mamba-2 override it with one pass whose projections take the decode rows and the prompt tokens
together (each weight read once per step), split only around the conv and scan kernels.

States live in the engine's ``StatePool``: ``states[layer][name]`` is a tensor ``[num_slots, *shape]``.
Slot 0 is the padding slot: CUDA-graph padding rows read and write it, never a real slot.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from rnnserve.kernels.chunking import Varlen
from rnnserve.kernels.dispatch import Backend

# The padding slot: CUDA-graph padding rows read and write it, so it is never handed to a request.
PAD_SLOT = 0

# states[layer][state_name] -> [num_slots, *spec.shape]
LayerStates = dict[str, torch.Tensor]
States = list[LayerStates]


@dataclass(frozen=True)
class StateSpec:
    """One per-sequence state tensor of one layer (the pool allocates ``[num_slots, *shape]``)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    # Value a fresh slot holds (RWKV-4's running max ``pp`` starts at -1e30, everything else at 0).
    fill: float = 0.0

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


# One (k_cache, v_cache) pair per attention layer, each [num_blocks, block_size, Hkv, D].
KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class KVSpec:
    """One attention layer's per-token cache: a key and a value of ``[num_kv_heads, head_dim]``
    each. The engine's KV cache holds them in blocks ``[num_blocks, block_size, Hkv, D]``."""

    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


@dataclass
class PagedKVMetadata:
    """Where a step's attention layers read and write the paged KV cache (built once per step by
    the runner; see kernels/paged_attention/README.md).

    caches:       per attention layer (``kv_specs`` order), (k_cache, v_cache) [num_blocks, bs, Hkv, D].
    block_tables: [B, max_blocks] int32, physical block of each sequence's logical blocks.
    seq_lens:     [B] int32, tokens cached for each sequence after this step (computed + new).
    slot_mapping: [T] int64 (one per new token; [B] in decode), the flattened cache row it goes to.
    max_seq_len:  max(seq_lens) as a host int (the CPU kernels pad to it; Triton decode ignores it).
    max_query_len: the most new tokens of one sequence (host int; 1 in decode).
    """

    caches: KVCaches
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    slot_mapping: torch.Tensor
    max_seq_len: int
    max_query_len: int


@dataclass
class PrefillBatch:
    """A packed variable-length batch of prompt chunks.

    input_ids:      [T] int64, the tokens of all sequences, concatenated.
    positions:      [T] int64, each token's absolute position in its sequence (RetNet rotation,
                    the Transformer baseline's KV cache); equals num_computed_tokens + offset.
    cu_seqlens:     [B + 1] int32, sequence boundaries in input_ids (cu_seqlens[0] = 0).
    cu_seqlens_cpu: the same boundaries as host ints, so no layer copies them back from the device.
    slot_ids:       [B] int64, the state slot of each sequence (never 0 for a real sequence).
    logits_indices: [M] int64, indices into the T tokens whose logits are returned, usually each
                    sequence's last token (cu_seqlens[1:] - 1); all tokens for prompt logprobs.
    varlen:         built from the two above: what the varlen kernels share across the layers of a
                    step (host boundaries, token -> sequence map, chunk layouts, each built once).
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens: torch.Tensor
    slot_ids: torch.Tensor
    logits_indices: torch.Tensor
    cu_seqlens_cpu: tuple[int, ...]
    kv: PagedKVMetadata | None = None  # set when the model has attention layers (kv_specs)
    varlen: Varlen = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.cu_seqlens_cpu = tuple(self.cu_seqlens_cpu)
        if len(self.cu_seqlens_cpu) != self.cu_seqlens.shape[0]:
            raise ValueError(
                f"cu_seqlens_cpu has {len(self.cu_seqlens_cpu)} entries, cu_seqlens {self.cu_seqlens.shape[0]}"
            )
        self.varlen = Varlen(self.cu_seqlens, self.cu_seqlens_cpu)

    @property
    def num_seqs(self) -> int:
        return self.slot_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]


@dataclass
class DecodeBatch:
    """One token per sequence.

    input_ids: [B] int64, positions: [B] int64 (absolute), slot_ids: [B] int64.
    Padding rows (CUDA-graph buckets) use slot 0 (``PAD_SLOT``) and any token id.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_ids: torch.Tensor
    kv: PagedKVMetadata | None = None  # set when the model has attention layers (kv_specs)

    @property
    def num_seqs(self) -> int:
        return self.slot_ids.shape[0]


@dataclass
class MixedBatch:
    """A step with both decodes and prompt chunks, for one model pass: the packed tokens are the
    decode rows first (one per sequence), then the prefill's tokens.

    decode:         the decode rows (their slots, ids, positions).
    prefill:        the prompt chunks; its cu_seqlens, varlen and logits_indices count from its own
                    first token (row ``num_decodes`` of the packed batch).
    input_ids:      [num_decodes + T] int64, both sets of ids, packed.
    logits_indices: [num_decodes + M] int64, rows of the packed batch whose logits are returned: every
                    decode row, then the prefill's ``logits_indices`` shifted by ``num_decodes``.
    """

    decode: DecodeBatch
    prefill: PrefillBatch
    input_ids: torch.Tensor
    logits_indices: torch.Tensor

    @classmethod
    def pack(cls, decode: DecodeBatch, prefill: PrefillBatch) -> MixedBatch:
        """Decode rows first, then the prefill's tokens (its logits rows shifted past the decodes)."""
        n = decode.num_seqs
        return cls(
            decode=decode,
            prefill=prefill,
            input_ids=torch.cat([decode.input_ids, prefill.input_ids]),
            logits_indices=torch.cat(
                [torch.arange(n, device=prefill.logits_indices.device), prefill.logits_indices + n]
            ),
        )

    @property
    def num_decodes(self) -> int:
        return self.decode.num_seqs


class RecurrentLM(nn.Module, ABC):
    """A causal LM whose per-sequence memory is a fixed set of state tensors per layer.

    Subclasses set ``vocab_size`` and implement the three abstract methods. Logits are returned
    in float32 whatever the model dtype: the sampler and logprobs need the precision.
    """

    vocab_size: int

    @abstractmethod
    def state_specs(self) -> list[list[StateSpec]]:
        """Per layer, the state tensors one sequence keeps."""

    @abstractmethod
    def prefill(self, batch: PrefillBatch, states: States) -> torch.Tensor:
        """Run prompt chunks from their slots' states; return logits [M, vocab] (float32)."""

    @abstractmethod
    def decode(self, batch: DecodeBatch, states: States) -> torch.Tensor:
        """Run one token per sequence from its slot's state; return logits [B, vocab] (float32)."""

    def mixed(self, batch: MixedBatch, states: States) -> torch.Tensor:
        """A step of decodes and prompt chunks: logits [num_decodes + M, vocab], the decode rows first.

        This default makes two passes (``decode``, then ``prefill``; their slots are disjoint), reading
        every weight twice. Families override it with one pass whose projections take all rows at once,
        split only around the conv / scan / recurrence kernels."""
        return torch.cat([self.decode(batch.decode, states), self.prefill(batch.prefill, states)])

    @classmethod
    @abstractmethod
    def from_hf_config(cls, config: dict, *, backend: Backend) -> RecurrentLM:
        """Build the module (uninitialised weights are fine) from a config.json dict.

        The loader calls this under ``with torch.device(device)`` and casts to the model dtype
        afterwards, then calls ``load_weights`` and ``post_load``.
        """

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (checkpoint names) into parameters; return the parameter names
        filled. The loader fails with a clear error if any parameter was not filled."""

    def kv_specs(self) -> list[KVSpec]:
        """The paged KV cache of each attention layer, in layer order (none for a pure recurrent
        model). The engine allocates the blocks; each batch's ``kv.caches`` hands them over."""
        return []

    def post_load(self) -> None:
        """Hook after weights are loaded (e.g. keep A = -exp(A_log) as an fp32 buffer)."""

    def quantize_int8(self) -> None:
        """``--quantization int8``: swap the linear layers for ``layers.Int8Linear`` (after post_load).
        Families that do not implement it refuse with a clear error."""
        raise NotImplementedError(f"--quantization int8 is not implemented for {type(self).__name__}")

    def limit_context(self, max_model_len: int) -> None:
        """Called before the state pool is sized, with the served ``--max-model-len``. A recurrent
        state does not depend on it (the default does nothing); a KV cache sizes itself to it."""

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def last_token_indices(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[B] int64: index of each sequence's last token in the packed batch."""
    return (cu_seqlens[1:] - 1).long()
