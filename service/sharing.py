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

# Fewer candidates than this per chunk are not split: a chunk's fixed costs (rotating the query, lookup tables)
# would outweigh the share of the scoring it moves. A judgement, not tuned: measured only at 100 candidates.
MIN_CHUNK = 16


class IdleWorkers:
    """How many of ``workers`` search workers are idle, and threads to lend their cores to a running search."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.running = 0
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

    def idle(self) -> int:
        """Workers no search holds now."""
        return max(0, self.workers - self.running)

    def split(self, score: Callable[[np.ndarray], torch.Tensor], rows: np.ndarray) -> torch.Tensor:
        """``score(rows)`` (scores along the first axis, one per row), computed in chunks: one here and one on a
        helper thread per idle worker; the same scores in the same order."""
        parts = 1 + min(self.idle(), self.workers - 1, len(rows) // MIN_CHUNK - 1)
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
