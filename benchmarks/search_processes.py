"""Re-ranks per second in one thread, in N threads of one process and in N processes: what Python's global
interpreter lock costs the service's search threads (why ``HAT_PROCESSES`` exists).

    python benchmarks/search_processes.py --index DIR/index --queries DIR/world/manifest.jsonl \\
        [--model models/demo] [--parallel 2] [--calls 600] [--candidates 100]

Each caller (thread or process) has one torch thread and runs ``--calls`` re-ranks of ``--candidates`` FAISS
candidates for captions of ``--queries`` (a builder manifest or one query per line; encoded once, beforehand),
the same calls the service makes (``GalleryIndex.rerank_images``, float32). Prints re-ranks per second for each
layout and each caller's median.
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service_load import read_queries  # noqa: E402 (benchmarks/ is the script's own directory)


def _setup(args):
    import numpy as np
    import torch

    from index_format import open_index
    from model import load_model

    torch.set_num_threads(1)
    model = load_model(args.model)
    index = open_index(args.index)
    captions = read_queries(args.queries)[:300]
    with torch.inference_mode():
        levels, lengths = model.encode_text_strings(captions)
        vectors = model.global_texts(levels, lengths).numpy().astype(np.float32)
    _, rows = index.search("images", vectors, args.candidates)

    def rerank(i: int) -> None:
        i %= len(captions)
        n = int(lengths[i])
        with torch.inference_mode():
            index.rerank_images([t[i : i + 1, :n] for t in levels], n, rows[i])

    for i in range(30):  # warm-up
        rerank(i)
    return rerank


def _calls(rerank, calls: int, out: list) -> None:
    times = []
    for i in range(calls):
        start = time.perf_counter()
        rerank(i)
        times.append(time.perf_counter() - start)
    out.append(sorted(times)[calls // 2] * 1000.0)


def _process(args, barrier, queue) -> None:
    rerank = _setup(args)
    out: list = []
    barrier.wait()
    start = time.perf_counter()
    _calls(rerank, args.calls, out)
    queue.put((out[0], time.perf_counter() - start))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--model", default=str(REPO / "models" / "demo"))
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--calls", type=int, default=600)
    parser.add_argument("--candidates", type=int, default=100)
    args = parser.parse_args()

    rerank = _setup(args)
    for callers in (1, args.parallel):
        out: list = []
        threads = [threading.Thread(target=_calls, args=(rerank, args.calls, out)) for _ in range(callers)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rate = callers * args.calls / (time.perf_counter() - start)
        medians = ", ".join(f"{m:.2f}" for m in out)
        print(f"{callers} thread(s) of one process: {rate:.0f} re-ranks/s (median per call: {medians} ms)")

    context = multiprocessing.get_context("spawn")
    barrier, queue = context.Barrier(args.parallel), context.Queue()
    procs = [context.Process(target=_process, args=(args, barrier, queue)) for _ in range(args.parallel)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    rate = sum(args.calls / seconds for _, seconds in results)
    medians = ", ".join(f"{m:.2f}" for m, _ in results)
    print(f"{args.parallel} processes: {rate:.0f} re-ranks/s (median per call: {medians} ms)")


if __name__ == "__main__":
    main()
