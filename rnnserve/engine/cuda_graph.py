"""CUDA-graph decode: ``model.decode`` captured once per batch-size bucket, replayed each step.

A decode step of a recurrent model is a few hundred small kernels whose launch overhead dwarfs their
work at small batch; a graph replays them all with one launch. Buckets form a ladder (1, 2, 4, 8,
16, 32, ... up to the largest decode batch). A step of B sequences copies its ids, positions and
slots into the static input buffers, pads rows B..bucket-1 with token 0, position 0 and the padding
slot 0 (so padding reads and writes only slot 0, never a real sequence's state), replays the
smallest bucket >= B and returns the first B rows of its logits. Larger batches run eagerly.

The states are the pool's tensors, updated in place by the captured kernels: the graph holds their
addresses, so the pool must never reallocate them (it does not).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
from tqdm import tqdm

from rnnserve.models.base import PAD_SLOT, DecodeBatch, RecurrentLM, States

logger = logging.getLogger(__name__)


def batch_size_ladder(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, 16, 32, ... below ``max_batch_size``, then ``max_batch_size`` itself."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    sizes = []
    b = 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch_size)
    return sizes


class CUDAGraphDecoder:
    """Callable ``(DecodeBatch) -> logits [B, V]`` replaying captured decode graphs.

    Build it, then call ``capture()`` once at start-up (before any request has a slot: the warm-up and
    capture runs write only slot 0).
    """

    def __init__(self, model: RecurrentLM, states: States, max_batch_size: int) -> None:
        self.model = model
        self.states = states
        self.device = model.device
        self.buckets = batch_size_ladder(max_batch_size)
        self.max_batch_size = self.buckets[-1]
        n = self.max_batch_size
        # Static inputs shared by every bucket's graph (bucket b reads the first b rows).
        self.input_ids = torch.zeros(n, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(n, dtype=torch.long, device=self.device)
        self.slot_ids = torch.full((n,), PAD_SLOT, dtype=torch.long, device=self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}  # anything with replay() (tests emulate them)
        self.outputs: dict[int, torch.Tensor] = {}  # bucket -> static logits [bucket, V]
        self._pool: tuple | None = None

    def _static_batch(self, size: int) -> DecodeBatch:
        return DecodeBatch(self.input_ids[:size], self.positions[:size], self.slot_ids[:size])

    @torch.inference_mode()
    def capture(self, progress: bool = True) -> None:
        """Capture every bucket, largest first so smaller graphs reuse its memory pool."""
        if self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA model, this one is on {self.device}")
        torch.cuda.synchronize(self.device)
        free_before, _ = torch.cuda.mem_get_info(self.device)
        t0 = time.perf_counter()
        self.input_ids.zero_()
        self.positions.zero_()
        self.slot_ids.fill_(PAD_SLOT)
        self._pool = torch.cuda.graph_pool_handle()
        # Warm up on a side stream (what torch.cuda.graph requires): compiles Triton kernels, picks
        # cuBLAS algorithms and fills the caching allocator before anything is recorded.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for size in self.buckets:
                self.model.decode(self._static_batch(size), self.states)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        for size in tqdm(sorted(self.buckets, reverse=True), desc="Capturing CUDA graphs", disable=not progress):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self.outputs[size] = self.model.decode(self._static_batch(size), self.states)
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)
        free_after, _ = torch.cuda.mem_get_info(self.device)
        logger.info(
            "captured %d CUDA graphs (batch sizes %s) in %.2f s using %.1f MiB",
            len(self.graphs),
            ",".join(map(str, self.buckets)),
            time.perf_counter() - t0,
            (free_before - free_after) / 2**20,
        )

    def bucket_for(self, batch_size: int) -> int | None:
        """The smallest captured bucket holding ``batch_size`` rows (None: run eagerly)."""
        for size in self.buckets:
            if size >= batch_size:
                return size if size in self.graphs else None
        return None

    def __call__(self, batch: DecodeBatch) -> torch.Tensor:
        b = batch.num_seqs
        size = self.bucket_for(b)
        if size is None:
            return self.model.decode(batch, self.states)
        self.input_ids[:b].copy_(batch.input_ids, non_blocking=True)
        self.positions[:b].copy_(batch.positions, non_blocking=True)
        self.slot_ids[:b].copy_(batch.slot_ids, non_blocking=True)
        if size > b:
            self.input_ids[b:size].zero_()
            self.positions[b:size].zero_()
            self.slot_ids[b:size].fill_(PAD_SLOT)
        self.graphs[size].replay()
        # A copy: the static output is overwritten by the next replay.
        return self.outputs[size][:b].clone()


def eager_decoder(model: RecurrentLM, states: States) -> Callable[[DecodeBatch], torch.Tensor]:
    def run(batch: DecodeBatch) -> torch.Tensor:
        return model.decode(batch, states)

    return run
