"""Idle search workers lend their core to the searches running: one query's re-rank split over them.

The service runs ``HAT_WORKERS`` searches at a time, each on one torch thread by default (several intra-op
threads per search collapse next to a busy process: docs/benchmarks.md). With fewer searches running than
workers, cores sit idle while the running query re-ranks its candidates alone. :class:`IdleWorkers` counts the
searches running; a re-rank then splits its candidates into one chunk per idle worker plus its own, scores the
extra chunks on helper threads (plain Python threads, each running single-threaded torch operators that
release the GIL) and joins the scores. The candidates' scores are independent of each other, so the split
changes no score (``tests/service/test_sharing.py``). No barrier ties the chunks together: next to a busy
neighbour process a chunk is late by at most its own length, never by a spin-wait for a descheduled thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import torch

# A chunk must hold at least this many token pairs (a query token scored against a candidate's token, all levels),
# or the re-rank is not split: a chunk's fixed costs (handing it to a thread, rotating the query, its lookup tables)
# outweigh the scoring it moves. Measured over HTTP on AMD EPYC (docs/benchmarks.md, "Idle workers' cores by
# size"): 100 demo candidates (84 tokens each, ~17-token queries: ~143 K pairs) re-ranked in 7.0-8.8 ms alone and
# 8.5-11.3 ms split in two; 100 HAT-base candidates (1,029 tokens: ~1.75 M pairs) in ~60 ms alone, ~45 split.
# The bound sits where a half-chunk's work (~34 ns a pair on one core) clearly exceeds those ~3 ms of fixed costs.
MIN_CHUNK_PAIRS = 200_000


class IdleWorkers:
    """How many of ``workers`` search workers are idle, and threads to lend their cores to a running search."""

    def __init__(self, workers: int, min_pairs: int = MIN_CHUNK_PAIRS) -> None:
        self.workers, self.min_pairs = workers, min_pairs
        self.running = 0
        self.requests = 0  # search requests in the service (submitted to a batcher, not yet answered)
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(workers - 1, thread_name_prefix="hat-rerank") if workers > 1 else None

    @contextmanager
    def search(self) -> Iterator[None]:
        """Counts one search (a batch) as running while the block runs."""
        with self._lock:
            self.running += 1
        try:
            yield
        finally:
            with self._lock:
                self.running -= 1

    def count_requests(self, change: int) -> None:
        """A batcher's ``on_submit``: ``change`` requests arrived (+1) or were answered (-1)."""
        with self._lock:
            self.requests += change

    def quiet(self, batch: int) -> bool:
        """Whether a batch of ``batch`` requests is all the service holds and another worker is idle: nothing
        else wants the cores now (a request that arrives later shares them)."""
        with self._lock:
            return self.requests <= batch and self.running < self.workers

    def idle(self) -> int:
        """Workers no search holds now."""
        return max(0, self.workers - self.running)

    def split(self, score: Callable[[np.ndarray], torch.Tensor], rows: np.ndarray, pairs_per_row: int
              ) -> torch.Tensor:
        """``score(rows)`` (scores along the first axis, one per row), computed in chunks: one here and one on a
        helper thread per idle worker, each chunk at least ``min_pairs`` token pairs (``pairs_per_row`` a row);
        the same scores in the same order."""
        parts = 1 + min(self.idle(), self.workers - 1, len(rows) * pairs_per_row // self.min_pairs - 1)
        if parts <= 1:
            return score(rows)
        chunks = np.array_split(np.asarray(rows), parts)
        lent = [self._pool.submit(_scored, score, chunk) for chunk in chunks[1:]]
        first = score(chunks[0])
        return torch.cat([first, *(future.result() for future in lent)])

    def close(self) -> None:
        """Stops the helper threads (chunks not started are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


def _scored(score: Callable[[np.ndarray], torch.Tensor], rows: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():  # thread-local: the helper thread enters it itself
        return score(rows)
