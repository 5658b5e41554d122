"""Query encoding: speed of each text-encoder precision at HAT-base sizes, fidelity on the demo test split.

    python benchmarks/query_encoder.py speed [--threads 2] [--runs 60]
    python benchmarks/query_encoder.py fidelity [--queries 1000]
    python benchmarks/query_encoder.py choose              # what the service's start-up choice picks here
    python benchmarks/query_encoder.py int8-study          # why no int8 variant is offered (demo model)
    python benchmarks/query_encoder.py weights             # the encoder's products: weights streamed vs cached
    python benchmarks/query_encoder.py sessions --mode M   # a 2nd ONNX session's memory (plain, shared, ...)

``speed``: HAT-base sizes (BERT-base, random weights, seed 0, float16-saved weights as ``prepare-base``
makes them), one caption per forward as a search encodes it (tokenise, BERT, projections), median / p90 over
``--runs`` captions after warm-up, per precision of ``model.precision``.

``fidelity``: the demo model over the generated test split (1,000 images, 5,000 captions). For every
``5000 / --queries``-th caption, the search's own two stages in memory: FAISS-equivalent exact top-100 by the
global vectors, then the HAT re-rank of those 100 with float32 image features; once with float32 query
features and once with each precision's. Reported: top-10 agreement of the final ranking (share of
float32's top 10 in the precision's top 10), top-1 agreement, and the mean / max absolute error of the HAT
score over float32's 100 candidates.

``int8-study``: where int8 loses the demo model's features. Each variant replaces the text encoder's linear
layers by a float32 simulation ("fake quantisation": values rounded to the int8 grid, products in float32) of
one way to quantise them, and reports the relative error of the token features against float32 over the test
split's first captions: weights only (per output channel), activations only (per tensor, as dynamic
quantisation does; per token), activations of one kind of layer only, and SmoothQuant-style scaling
(``x W^T = (x / s)(W s)^T`` with ``s = max|x|^a / max|W|^(1-a)`` per input channel, ``max|x|`` calibrated on
the probe captions) with per-channel weights and per-tensor activations.
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


class _FakeInt8(torch.nn.Module):
    """A linear layer computing in float32 what an int8 scheme would (see ``int8-study``)."""

    def __init__(self, linear, weights: bool, acts: str | None, smooth: torch.Tensor | None = None) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        self.scale = None if smooth is None else 1.0 / smooth
        if smooth is not None:
            w = w * smooth[None, :]
        if weights:
            step = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
            w = (w / step).round().clamp(-127, 127) * step
        self.weight, self.bias, self.acts = w, linear.bias.detach().float(), acts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            x = x * self.scale
        if self.acts == "tensor":  # asymmetric uint8 over the whole input, as quantize_dynamic's activations
            lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
            step = ((hi - lo) / 255).clamp_min(1e-12)
            zero = (-lo / step).round()
            x = ((x / step).round() + zero).clamp(0, 255).sub(zero) * step
        elif self.acts == "token":
            step = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127
            x = (x / step).round() * step
        return torch.nn.functional.linear(x, self.weight, self.bias)


def cmd_int8_study(args) -> None:
    import copy
    import json

    from model.precision import PROBES

    torch.set_num_threads(args.threads)
    model = load_model(REPO / "models" / "demo")
    base = model.text_encoder
    rows = [json.loads(line) for line in Path(args.manifest).read_text().splitlines()[: args.images]]
    texts = [c for r in rows for c in r["captions"]]
    linears = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear)]
    peaks: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(_module, inputs, _output):
            peak = inputs[0].detach().abs().flatten(0, -2).amax(dim=0)
            peaks[name] = torch.maximum(peaks[name], peak) if name in peaks else peak
        return hook

    handles = [base.get_submodule(n).register_forward_hook(record(n)) for n in linears]
    for probe in PROBES:
        _encode(model, base, [probe])
    for handle in handles:
        handle.remove()

    def features(encoder):
        out = [_encode(model, encoder, [t])[0] for t in texts]
        return [torch.cat([o[level][0] for o in out]) for level in range(len(out[0]))]

    reference = features(base)

    def variant(make, only=lambda name: True):
        clone = copy.deepcopy(base)
        for name in linears:
            if only(name):
                parent, _, child = name.rpartition(".")
                setattr(clone.get_submodule(parent), child, make(name, base.get_submodule(name)))
        errs = torch.cat([((a - b).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12))
                          for a, b in zip(reference, features(clone), strict=True)])  # fmt: skip
        return float(errs.mean()), float(errs.max())

    def smooth(alpha):
        def make(name, linear):
            w = linear.weight.detach().abs().amax(dim=0).clamp_min(1e-5)
            s = (peaks[name].clamp_min(1e-5) ** alpha / w ** (1 - alpha)).clamp_min(1e-5)
            return _FakeInt8(linear, True, "tensor", s)
        return make

    ffn2 = lambda n: n.endswith("output.dense") and "attention" not in n  # noqa: E731
    cases = [
        ("int8 weights only (per output channel)", lambda n, lin: _FakeInt8(lin, True, None), None),
        ("int8 activations only, per tensor", lambda n, lin: _FakeInt8(lin, False, "tensor"), None),
        ("int8 activations only, per token", lambda n, lin: _FakeInt8(lin, False, "token"), None),
        ("  ... only into query/key/value", lambda n, lin: _FakeInt8(lin, False, "tensor"), lambda n: ".self." in n),
        ("  ... only into attention output", lambda n, lin: _FakeInt8(lin, False, "tensor"),
         lambda n: "attention.output" in n),
        ("  ... only into FFN in", lambda n, lin: _FakeInt8(lin, False, "tensor"), lambda n: "intermediate" in n),
        ("  ... only into FFN out", lambda n, lin: _FakeInt8(lin, False, "tensor"), ffn2),
        ("weights + activations per tensor (quantize_dynamic)", lambda n, lin: _FakeInt8(lin, True, "tensor"), None),
        ("SmoothQuant a=0.5, weights per channel", smooth(0.5), None),
        ("SmoothQuant a=0.75, weights per channel", smooth(0.75), None),
    ]
    print(f"demo text encoder, {len(texts)} captions; relative token-feature error against float32 (mean, max)")
    for label, make, only in cases:
        mean, worst = variant(make, only or (lambda name: True))
        print(f"{label:55s} mean {100 * mean:6.2f}%  max {100 * worst:6.2f}%", flush=True)


def cmd_weights(args) -> None:
    """The text encoder's matrix products for one query, with the weights streamed from memory as a forward does
    (each of BERT-base's linear layers once, in order) and with one layer's weights reused (cache-resident)."""
    from torch.nn import functional as F

    torch.set_num_threads(args.threads)
    model = _base_model()
    linears = [m for m in model.text_encoder.modules() if isinstance(m, torch.nn.Linear)]
    print(f"HAT-base text encoder: {len(linears)} linear layers, {args.tokens} tokens, {args.threads} thread(s)")

    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            weights = [m.weight.detach().to(dtype).contiguous() for m in linears]
            xs = {k: torch.randn(1, args.tokens, k).to(dtype) for k in {w.shape[1] for w in weights}}
            total = _median_ms(lambda ws=weights, xs=xs: [F.linear(xs[w.shape[1]], w) for w in ws], args.runs)
            size = sum(w.numel() * w.element_size() for w in weights)
            cells = []
            for shape in sorted({tuple(w.shape) for w in weights}):
                w = next(w for w in weights if tuple(w.shape) == shape)
                x = xs[shape[1]]
                cached = _median_ms(lambda w=w, x=x: [F.linear(x, w) for _ in range(20)], args.runs) / 20
                cells.append(f"{shape[1]}x{shape[0]} {cached * 1000:.0f} us")
            print(f"{str(dtype).removeprefix('torch.'):9s} streamed: {total:6.1f} ms for {size / 2**20:.0f} MiB of "
                  f"weights ({total * 1000 / len(weights):.0f} us a product, {size / total / 1e6:.1f} GB/s); "
                  f"cache-resident: " + ", ".join(cells), flush=True)


def _median_ms(fn, runs: int) -> float:
    """Median wall time of ``fn()`` over ``runs`` calls after one warm-up call, in milliseconds."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


def cmd_sessions(args) -> None:
    """HAT-base's ONNX text encoder: a 1-thread session (the service's) and a second, 2-thread one, each session's
    resident memory and median time for one 17-token query. ``plain``: two independent sessions (each holds its
    weights); ``shared``: both take the float32 weights from the same ``OrtValue``s
    (``SessionOptions.add_initializer``); ``shared-noprepack``: also without ONNX Runtime's pre-packed copies of
    the weights. Run each mode in its own process (resident memory only grows)."""
    import onnxruntime as ort

    from model.precision import OnnxTextEncoder

    model = _base_model()
    made = {}
    real = ort.InferenceSession

    def keep(data, options, **kwargs):  # the bytes the service's own export gives
        made["bytes"] = data
        return real(data, options, **kwargs)

    ort.InferenceSession = keep
    try:
        OnnxTextEncoder(model.text_encoder, 1)
    finally:
        ort.InferenceSession = real
    data = made["bytes"]
    del model
    before = _rss_mib()
    shared = {}
    if args.mode != "plain":
        import onnx
        from onnx import numpy_helper

        graph = onnx.load_from_string(data).graph
        shared = {t.name: ort.OrtValue.ortvalue_from_numpy(numpy_helper.to_array(t).copy()) for t in graph.initializer
                  if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) >= 1024}  # fmt: skip
        del graph

    def session(threads: int):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if args.mode == "shared-noprepack":
            options.add_session_config_entry("session.disable_prepacking", "1")
        for name, value in shared.items():
            options.add_initializer(name, value)
        return real(data, options, providers=["CPUExecutionProvider"])

    ids = np.random.default_rng(0).integers(1000, 20000, (1, 17))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}

    def median_ms(s) -> float:
        for _ in range(4):  # warm-up (one more in _median_ms)
            s.run(None, feeds)
        return _median_ms(lambda: s.run(None, feeds), args.runs)

    held = _rss_mib()
    one = session(1)
    after_one = _rss_mib()
    two = session(2)
    after_two = _rss_mib()
    same = all(np.array_equal(a, b) for a, b in zip(one.run(None, feeds), two.run(None, feeds), strict=True))
    print(f"{args.mode}: shared weights +{held - before:.0f} MiB, first session +{after_one - held:.0f} MiB, second "
          f"+{after_two - after_one:.0f} MiB, in all +{after_two - before:.0f} MiB; "
          f"1 thread {median_ms(one):.1f} ms, 2 threads {median_ms(two):.1f} ms; identical outputs {same}",
          flush=True)  # fmt: skip


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
    study = sub.add_parser("int8-study", help="demo model: feature error of int8 schemes, simulated in float32")
    study.add_argument("--manifest", default=str(REPO / "data/world/manifest.jsonl"), help="captions' manifest")
    study.add_argument("--images", type=int, default=60, help="its first N items' captions (default 60)")
    study.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    weights = sub.add_parser("weights", help="HAT-base: the encoder's products with streamed vs cached weights")
    weights.add_argument("--tokens", type=int, default=17, help="query tokens (default 17)")
    weights.add_argument("--runs", type=int, default=15, help="timed passes (default 15)")
    weights.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    sessions = sub.add_parser("sessions", help="HAT-base: memory and speed of a second, 2-thread ONNX session")
    sessions.add_argument("--mode", choices=("plain", "shared", "shared-noprepack"), default="shared")
    sessions.add_argument("--runs", type=int, default=30, help="timed queries per session (default 30)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"speed": cmd_speed, "fidelity": cmd_fidelity, "choose": cmd_choose, "int8-study": cmd_int8_study,
                "weights": cmd_weights, "sessions": cmd_sessions}
    commands[args.what](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
