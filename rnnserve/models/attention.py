"""Attention layers over the engine's paged KV cache, shared by the families that have them.

``PagedAttention`` holds the LLaMA-layout projections (``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``;
GQA when ``num_kv_heads < num_heads``) and runs ``kernels/paged_attention`` on the step's
``PagedKVMetadata``: prefill writes the chunk's keys and values into the sequence's blocks and attends
over its cached prefix plus the chunk; decode does the same for one token. ``rope_cos_sin`` and
``apply_rope`` implement RoPE, also partial (only the first ``rotary_dim`` dims of each head rotate,
as Bamba's ``partial_rotary_factor`` asks).
"""

from __future__ import annotations

import torch
from torch import nn

from rnnserve.kernels.dispatch import Backend, get_kernel
from rnnserve.models.base import PagedKVMetadata


def rope_inv_freq(rotary_dim: int, theta: float, device: torch.device | str | None = None) -> torch.Tensor:
    """[rotary_dim / 2] fp32 inverse frequencies of the default RoPE."""
    return 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim))


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, 1, rotary_dim] for positions [N] (angles in fp32, then cast as transformers does)."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [N, rot/2]
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, H, hd]: the first ``cos.shape[-1]`` dims rotated (rotate-half layout), the rest kept."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    return rotated if x_pass.shape[-1] == 0 else torch.cat((rotated, x_pass), dim=-1)


class PagedAttention(nn.Module):
    """Causal self-attention with q/k/v/o projections, reading and writing one layer's paged cache."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        bias: bool,
        backend: Backend,
        scale: float | None = None,
    ) -> None:
        """``scale`` multiplies q·k (default 1/sqrt(head_dim); Granite's ``attention_multiplier``)."""
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads {num_heads} is not a multiple of num_key_value_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias)
        self._prefill = get_kernel("paged_attention.prefill", backend)
        self._decode = get_kernel("paged_attention.decode", backend)

    def _qkv(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, D] -> q [N, H, hd], k and v [N, Hkv, hd], RoPE (if any) applied to q and k."""
        n = x.shape[0]
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        if rope is None:  # learned absolute positions (GPT-2)
            return q, k, v
        return apply_rope(q, *rope), apply_rope(k, *rope), v

    def prefill(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        kv: PagedKVMetadata,
        cache: int,
        cu_seqlens: torch.Tensor,
    ) -> torch.Tensor:
        """x [T, D] packed by ``cu_seqlens``; ``cache``: this layer's index in ``kv.caches``. -> [T, D]."""
        return self.attend_prefill(*self._qkv(x, rope), kv, cache, cu_seqlens)

    def attend_prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv: PagedKVMetadata,
        cache: int,
        cu_seqlens: torch.Tensor,
    ) -> torch.Tensor:
        """``prefill`` from projected q [T, H, hd], k and v [T, Hkv, hd] (positions applied), for a
        family that projects its own (Zamba2's per-position adapters) -> o_proj(attention) [T, D_out]."""
        k_cache, v_cache = kv.caches[cache]
        o = self._prefill(
            q,
            k,
            v,
            k_cache,
            v_cache,
            cu_seqlens,
            kv.seq_lens,
            kv.block_tables,
            kv.slot_mapping,
            self.scale,
            kv.max_query_len,
            kv.max_seq_len,
        )
        return self.o_proj(o.flatten(1))

    def decode(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, kv: PagedKVMetadata, cache: int
    ) -> torch.Tensor:
        """x [B, D], one token per sequence -> [B, D]."""
        return self.attend_decode(*self._qkv(x, rope), kv, cache)

    def attend_decode(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: PagedKVMetadata, cache: int
    ) -> torch.Tensor:
        """``decode`` from projected q [B, H, hd], k and v [B, Hkv, hd] -> o_proj(attention) [B, D_out]."""
        k_cache, v_cache = kv.caches[cache]
        o = self._decode(
            q, k, v, k_cache, v_cache, kv.seq_lens, kv.block_tables, kv.slot_mapping, self.scale, kv.max_seq_len
        )
        return self.o_proj(o.flatten(1))
