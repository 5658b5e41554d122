"""Re-ranking benchmark at HAT-base sizes: 1 caption x K candidate images, and 1 image x K captions.

Features are random (the cost does not depend on the weights): per image 784/196/49 tokens at levels 1-3,
D = 768, captions of 14 tokens. Compares the project's scorer (float32 and bfloat16 matrix products, region
norms cached as the index stores them) with a straightforward implementation of the same formula that
forms the attended context per level (as the authors' per-caption loop does), in the same run.

    python benchmarks/rerank.py [--candidates 100] [--runs 15] [--device cpu]

Prints median / p90 milliseconds over the runs after warm-up, the bf16-vs-fp32 score error, and the peak
resident memory each scenario adds (Linux VmHWM). The script re-executes itself with a fixed glibc mmap
threshold so that freed tensors leave the resident set and the high-water mark measures each call alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from model.alignment import hierarchical_similarity, region_norms

LEVEL_TOKENS = (784, 196, 49)
DIM = 768
CAPTION_LEN = 14
LAMBDA = 9.0


def straightforward(images, texts, lengths, direction):
    """The formula as written, one caption at a time, forming the D-wide attended context."""
    out = torch.zeros(images[0].shape[0], texts[0].shape[0])
    for j in range(texts[0].shape[0]):
        n = int(lengths[j])
        for x, t in zip(images, texts, strict=True):
            words = t[j, :n].unsqueeze(0).expand(x.shape[0], -1, -1)  # [N, n, D]
            query, context = (x, words) if direction == "i2t" else (words, x)
            attn = F.leaky_relu(context @ query.transpose(1, 2), 0.1)  # [N, ctx, q]
            attn = attn / (attn.norm(dim=2, keepdim=True) + 1e-8)
            attn = torch.softmax(attn.transpose(1, 2) * LAMBDA, dim=2)  # [N, q, ctx]
            weighted = attn @ context  # [N, q, D]
            cos = (query * weighted).sum(2) / (query.norm(dim=2) * weighted.norm(dim=2)).clamp_min(1e-8)
            out[:, j] += cos.mean(1)
    return out


def timed(fn: Callable[[], torch.Tensor], runs: int, warmup: int = 3) -> tuple[list[float], torch.Tensor]:
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return times, result


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def peak_extra_mb(fn: Callable[[], torch.Tensor]) -> float:
    """Resident memory the call adds at its peak (resets the high-water mark first; Linux only)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return float("nan")
    base = _status_kb("VmRSS")
    fn()
    return (_status_kb("VmHWM") - base) / 1024


def report(name: str, times: list[float], extra: str = "") -> None:
    times = sorted(times)
    p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
    print(f"  {name:<44} median {statistics.median(times):8.1f} ms   p90 {p90:8.1f} ms  {extra}")


def build_sections(k: int, dev: torch.device, straight: bool) -> list[tuple[str, dict[str, Callable]]]:
    """The benchmark's scenarios: (title, {name: zero-argument call returning scores})."""
    torch.manual_seed(0)
    images = [torch.randn(k, r, DIM, device=dev) for r in LEVEL_TOKENS]
    texts = [torch.randn(k, CAPTION_LEN, DIM, device=dev) for _ in LEVEL_TOKENS]
    lengths = torch.full((k,), CAPTION_LEN, device=dev)
    norms = [region_norms(x) for x in images]  # cached at index time
    images_bf16 = [x.bfloat16() for x in images]  # the stored half-precision features
    texts_bf16 = [t.bfloat16() for t in texts]
    q32, qbf, ql = [t[:1] for t in texts], [t[:1] for t in texts_bf16], lengths[:1]
    first = {
        "scorer float32": lambda: hierarchical_similarity(images, q32, ql, LAMBDA, "i2t", image_norms=norms),
        "scorer bfloat16": lambda: hierarchical_similarity(images_bf16, qbf, ql, LAMBDA, "i2t", image_norms=norms),
    }
    if straight:
        first["straightforward (context formed) float32"] = lambda: straightforward(images, q32, ql, "i2t")
    sections = [(f"1 caption x {k} images (i2t), levels {LEVEL_TOKENS} tokens, D={DIM}, caption {CAPTION_LEN}", first)]
    one32, onebf, one_norms = [x[:1] for x in images], [x[:1] for x in images_bf16], [n[:1] for n in norms]
    for direction in ("i2t", "t2i"):
        extra = {"image_norms": one_norms} if direction == "i2t" else {}
        sections.append(
            (
                f"1 image x {k} captions ({direction})",
                {
                    "scorer float32": lambda d=direction, e=extra: hierarchical_similarity(
                        one32, texts, lengths, LAMBDA, d, **e
                    ),
                    "scorer bfloat16": lambda d=direction, e=extra: hierarchical_similarity(
                        onebf, texts_bf16, lengths, LAMBDA, d, **e
                    ),
                },
            )
        )
    return sections


def memory_pass(args: argparse.Namespace) -> None:
    """Child process: one cold call per scenario, printing the resident memory it added at its peak."""
    for title, cases in build_sections(args.candidates, torch.device(args.device), not args.skip_straightforward):
        for name, fn in cases.items():
            print(f"{title}|{name}|{peak_extra_mb(fn):.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-straightforward", action="store_true")
    parser.add_argument("--memory-pass", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_pass:
        memory_pass(args)
        return
    # Peak memory is measured in a child with a fixed glibc mmap threshold, so that every large tensor is a
    # fresh mapping and freed memory leaves the resident set; timings are taken here with the normal malloc.
    child = subprocess.run(
        [sys.executable, *sys.argv, "--memory-pass"],
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"},
        capture_output=True,
        text=True,
        check=True,
    )
    peaks = {tuple(line.split("|")[:2]): line.split("|")[2] for line in child.stdout.splitlines() if "|" in line}
    dev = torch.device(args.device)
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, device {dev}"
    )
    for title, cases in build_sections(args.candidates, dev, not args.skip_straightforward):
        print(f"\n{title}")
        results = {}
        for name, fn in cases.items():
            runs = args.runs if "straight" not in name else max(10, args.runs // 2)
            times, results[name] = timed(fn, runs)
            report(name, times, f"peak +{peaks.get((title, name), '?')} MB")
        ref = results["scorer float32"]
        print(f"  bf16 vs fp32 summed-score max abs error: {(results['scorer bfloat16'] - ref).abs().max():.2e}")
        for name, value in results.items():
            if name.startswith("straightforward"):
                print(f"  straightforward vs scorer max abs difference: {(value - ref).abs().max():.2e}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
