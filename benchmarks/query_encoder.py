"""Query encoding: speed of each text-encoder precision at HAT-base sizes, fidelity on the demo test split.

    python benchmarks/query_encoder.py speed [--threads 2] [--runs 60]
    python benchmarks/query_encoder.py fidelity [--queries 1000]
    python benchmarks/query_encoder.py choose              # what the service's start-up choice picks here

``speed``: HAT-base sizes (BERT-base, random weights, seed 0, float16-saved weights as ``prepare-base``
makes them), one caption per forward as a search encodes it (tokenise, BERT, projections), median / p90 over
``--runs`` captions after warm-up, per precision of ``model.precision``.

``fidelity``: the demo model over the generated test split (1,000 images, 5,000 captions). For every
``5000 / --queries``-th caption, the search's own two stages in memory: FAISS-equivalent exact top-100 by the
global vectors, then the HAT re-rank of those 100 with float32 image features; once with float32 query
features and once with each precision's. Reported: top-10 agreement of the final ranking (share of
float32's top 10 in the precision's top 10), top-1 agreement, and the mean / max absolute error of the HAT
score over float32's 100 candidates.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from model import load_model  # noqa: E402
from model.precision import TEXT_PRECISIONS, choose_text_precision, text_encoder_in  # noqa: E402

QUERIES = (
    "a man riding a horse on a beach at sunset",
    "two small red circles left of a large blue square",
    "a plate of food with broccoli and rice on a wooden table",
    "a cat sleeping on a laptop keyboard next to a cup of coffee",
    "a yellow star above a green triangle",
    "people walking across a busy street in the rain with umbrellas",
)


def _base_model():
    from model import HATModel, HATTokenizer
    from training import paper_model_config

    torch.manual_seed(0)
    model = HATModel(paper_model_config()).eval()
    # prepare-base saves the weights as float16 and reloads them as float32: the same values here
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    model.tokenizer = HATTokenizer()
    return model


def _encode(model, encoder, texts):
    batch = model.tokenizer(list(texts))
    with torch.inference_mode():
        feats = encoder(batch.input_ids, batch.attention_mask)
        levels = [proj(f) for proj, f in zip(model.text_proj, feats, strict=True)]
        return levels, batch.lengths, model.global_texts(levels, batch.lengths)


def cmd_speed(args) -> None:
    torch.set_num_threads(args.threads)
    model = _base_model()
    print(f"HAT-base text encoder, {args.threads} thread(s), one caption per forward, {args.runs} runs")
    for name in args.precisions.split(","):
        encoder = text_encoder_in(model, name)
        for q in QUERIES:
            _encode(model, encoder, [q])
        times = []
        for i in range(args.runs):
            start = time.perf_counter()
            _encode(model, encoder, [QUERIES[i % len(QUERIES)]])
            times.append((time.perf_counter() - start) * 1000.0)
        times.sort()
        print(f"{name:9s} median {statistics.median(times):7.1f} ms  p90 {times[int(0.9 * len(times))]:7.1f} ms  "
              f"min {times[0]:6.1f} ms", flush=True)


def cmd_fidelity(args) -> None:
    from training.data import caption_table, read_karpathy
    from training.evaluate import encode_split

    model = load_model(REPO / "models" / "demo")
    entries = read_karpathy(args.dataset, args.images, "test")
    enc = encode_split(model, entries)
    texts, _ = caption_table(entries)
    picks = list(range(0, len(texts), max(1, len(texts) // args.queries)))
    image_global = enc.image_global.numpy()
    reference = {}
    for name in ["float32", *[p for p in args.precisions.split(",") if p != "float32"]]:
        encoder = text_encoder_in(model, name)
        top10, top1, err_mean, err_max = [], [], [], 0.0
        for start in range(0, len(picks), 64):
            chunk = [texts[i] for i in picks[start : start + 64]]
            levels, lengths, vectors = _encode(model, encoder, chunk)
            for j, q in enumerate(picks[start : start + 64]):
                n = int(lengths[j])
                query = [x[j : j + 1, :n] for x in levels]
                cands = np.argsort(-(image_global @ vectors[j].numpy()), kind="stable")[: args.candidates]
                scores = model.similarity([x[cands] for x in enc.image_levels], query, [n])[:, 0]
                order = cands[torch.argsort(scores, descending=True, stable=True).numpy()]
                if name == "float32":
                    reference[q] = (cands, scores, order, levels, n, j)
                    continue
                ref_cands, ref_scores, ref_order, _, _, _ = reference[q]
                top10.append(len(set(order[:10]) & set(ref_order[:10])) / 10)
                top1.append(float(order[0] == ref_order[0]))
                same = model.similarity([x[ref_cands] for x in enc.image_levels], query, [n])[:, 0]
                diff = (same - ref_scores).abs()
                err_mean.append(float(diff.mean()))
                err_max = max(err_max, float(diff.max()))
        if name != "float32":
            print(f"{name:9s} queries {len(top10):5d}  top-10 agreement {100 * np.mean(top10):6.2f}%  "
                  f"top-1 {100 * np.mean(top1):6.2f}%  score error mean {np.mean(err_mean):.1e} max {err_max:.1e}",
                  flush=True)


def cmd_choose(args) -> None:
    torch.set_num_threads(args.threads)
    model = _base_model() if args.model == "base" else load_model(args.model)
    started = time.perf_counter()
    _, choice = choose_text_precision(model)
    print(f"{choice.describe()} (measured in {time.perf_counter() - started:.1f} s)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    speed = sub.add_parser("speed", help="per precision: one caption per forward at HAT-base sizes")
    speed.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    speed.add_argument("--runs", type=int, default=60, help="timed captions per precision (default 60)")
    speed.add_argument("--precisions", default=",".join(TEXT_PRECISIONS), help="comma-separated (default all)")
    fid = sub.add_parser("fidelity", help="per precision: final-ranking agreement with float32 (demo test split)")
    fid.add_argument("--dataset", default=str(REPO / "data/world/dataset.json"), help="Karpathy-style split file")
    fid.add_argument("--images", default=str(REPO / "data/world/images"), help="its image folder")
    fid.add_argument("--queries", type=int, default=1000, help="caption queries (default 1000)")
    fid.add_argument("--candidates", type=int, default=100, help="first-stage candidates (default 100)")
    fid.add_argument("--precisions", default=",".join(TEXT_PRECISIONS), help="comma-separated (default all)")
    choose = sub.add_parser("choose", help="run the service's start-up choice and print what it measured")
    choose.add_argument("--model", default="base", help="'base' (random HAT-base) or a model path")
    choose.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    {"speed": cmd_speed, "fidelity": cmd_fidelity, "choose": cmd_choose}[args.what](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
