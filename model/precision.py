"""Precision of the query text encoder, chosen by measurement on the machine that serves.

A search encodes one short caption: at HAT-base sizes (BERT-base) that forward reads 85 M weights for a dozen
tokens, so its time is mostly weight traffic and small matrix products. Four ways to run it:

* ``float32``: the weights as trained.
* ``bfloat16``: the text encoder's linear layers with bfloat16 weights (:class:`BF16Linear`: inputs rounded
  to bfloat16 for the product, float32 out); layer norms, softmax, residual sums, the projections and the
  output features stay float32. Fast where the CPU has bfloat16 instructions (AMX, AVX-512 BF16).
* ``onnx``: the float32 encoder exported to ONNX and run by ONNX Runtime (:class:`OnnxTextEncoder`): the same
  arithmetic as float32 (features within ~1e-6), with ONNX Runtime's fused CPU kernels and none of the eager
  framework's per-operator overhead. Measured 2.0x faster than eager float32 for one BERT-base caption on one
  thread (39.9 against 81.6 ms; docs/benchmarks.md, Query encoding).
* ``int8``: the BERT linear layers dynamically quantised (``torch.ao.quantization.quantize_dynamic``: int8
  weights, activations quantised per call, int32 accumulation): a quarter of the weight traffic. A fused
  int8-weight kernel with float activations (``torch._weight_int8pack_mm``) measured 3x slower here.

``choose_text_precision`` times the candidates on the loaded model (a handful of single-caption forwards
each), drops any whose features stray from float32's by more than a bound, and keeps the fastest, unless a more
exact one is within ``TIE_MARGIN`` of it: start-up timings on a shared machine wander (bfloat16 and onnx swapped
places between two starts of the same service here), and a tie should not cost exactness. The
bound is on the relative error of the token features; what it means for rankings is measured offline
(``benchmarks/query_encoder.py``, docs/benchmarks.md "Query encoding").
"""

from __future__ import annotations

import contextvars
import copy
import logging
import statistics
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

logger = logging.getLogger(__name__)

TEXT_PRECISIONS = ("float32", "bfloat16", "int8", "onnx")
# Largest relative error (token feature, L2) a candidate may show against float32 on the probe captions. Measured
# on the demo model (benchmarks/query_encoder.py): bfloat16 linear layers moved its features by 1.0% and kept
# 99.40% of the final top 10 (the target is 99.5%); the whole encoder in bfloat16, 2.1% and 98.82%; int8, 115% and
# 73.9%. So the bound sits below 1%: on that model the choice stays float32.
MAX_FEATURE_ERROR = 0.008
# A less exact candidate must be faster than the more exact ones by more than this share to be chosen. Start-up
# medians of the same service on the same machine measured bfloat16 34.9 ms against onnx 40.4 ms in one start and
# 44.8 against 31.0 in another (HAT-base, AMD EPYC, 2026-12-03): differences under ~20% are noise here.
TIE_MARGIN = 0.2
# The wide session (OnnxTextEncoder.widen) is kept only when it beats the narrow one by more than this share on the
# probe captions: a small encoder's forwards are too short for a second thread to pay for waking it (and the wide
# session costs a copy of the weights).
WIDE_GAIN = 0.1
PROBES = (
    "a man riding a horse on a beach at sunset",
    "two small red circles left of a large blue square",
    "a plate of food with broccoli and rice on a wooden table",
    "a yellow star",
)


class BF16Linear(nn.Module):
    """``nn.Linear`` with bfloat16 weights: the input is rounded to bfloat16 for the product (accumulated in
    float32 by the CPU kernel) and the output returned in float32, so layer norms, softmax and residual sums stay
    float32. Half the weight traffic of float32; on the demo model its features moved by about a tenth of what
    running the whole encoder in bfloat16 did (docs/benchmarks.md, Query encoding)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().to(torch.bfloat16), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x.to(torch.bfloat16), self.weight).float()
        return y if self.bias is None else y + self.bias


class _FloatOutputs(nn.Module):
    """Runs ``inner`` (the text encoder) in ``dtype`` and returns its hidden states as float32."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        return [h.float() for h in self.inner(input_ids, attention_mask)]


class OnnxTextEncoder(nn.Module):
    """``encoder`` (a ``model.hat.TextEncoder``: ids and mask -> per level hidden states) exported to ONNX (in
    memory) and run by an ONNX Runtime CPU session with ``threads`` intra-op threads. Float32 throughout; batch and
    length are dynamic (a batch of captions padded to its longest, as the tokenizer gives it)."""

    def __init__(self, encoder: nn.Module, threads: int) -> None:
        super().__init__()
        import io

        import onnxruntime  # noqa: F401  (ImportError here when ONNX Runtime is missing, before the export)

        example = torch.ones(1, 8, dtype=torch.long)  # any ids: the trace records shapes as dynamic axes
        buffer = io.BytesIO()
        with warnings.catch_warnings(), torch.no_grad():  # the TorchScript exporter's deprecation and trace notes
            warnings.simplefilter("ignore")
            torch.onnx.export(
                encoder.eval(), (example, torch.ones_like(example)), buffer, dynamo=False, opset_version=17,
                input_names=["input_ids", "attention_mask"],
                output_names=[f"level{i}" for i in range(len(encoder.layers))],
                dynamic_axes={"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"}},
            )  # fmt: skip
        self._graph = buffer.getvalue()
        self.threads = max(1, threads)
        self.session = self._session(self.threads)
        self.wide, self.wide_threads = None, 0
        self.layers = encoder.layers

    def _session(self, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # No spinning pool threads: the service's other workers and neighbours need the cores between calls.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(self._graph, options, providers=["CPUExecutionProvider"])

    def widen(self, threads: int) -> bool:
        """Add a second session with ``threads`` intra-op threads, used for forwards inside
        :func:`wide_encoding` (the service: while its other search workers are idle). It holds its own copy of
        the weights (ONNX Runtime pre-packs them per session; sharing the initialisers saved only ~130 of
        ~440 MiB at BERT-base and cost ~3 ms: docs/benchmarks.md). Returns whether a session was added (not
        when ``threads`` is no more than the narrow session's)."""
        if threads <= self.threads:
            return False
        self.wide, self.wide_threads = self._session(threads), threads
        return True

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[torch.Tensor]:
        feeds = {
            "input_ids": input_ids.cpu().numpy().astype(np.int64, copy=False),
            "attention_mask": attention_mask.cpu().numpy().astype(np.int64, copy=False),
        }
        session = self.wide if self.wide is not None and _WIDE.get() else self.session
        return [torch.from_numpy(out) for out in session.run(None, feeds)]


# Whether this thread's (this context's) text forwards may use the wide session: see :func:`wide_encoding`.
_WIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("hat_wide_encoding", default=False)


@contextmanager
def wide_encoding(on: bool = True) -> Iterator[None]:
    """Within the block, an :class:`OnnxTextEncoder` with a wide session (:meth:`OnnxTextEncoder.widen`) runs
    its forwards there; other encoders are unaffected. Context-local, so concurrent searches choose each their
    own."""
    token = _WIDE.set(on)
    try:
        yield
    finally:
        _WIDE.reset(token)


def _bf16_linears(module: nn.Module) -> nn.Module:
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, BF16Linear(child))
        else:
            _bf16_linears(child)
    return module


def _int8_linears(module: nn.Module) -> nn.Module:
    """``module`` with its linear layers dynamically quantised: int8 weights (per tensor), activations
    quantised per call, int8 products with float32 accumulation (PyTorch's x86/fbgemm kernels)."""
    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():  # torch.ao.quantization says it moves to torchao; the kernels are these
        warnings.simplefilter("ignore")
        return quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8)


def text_encoder_in(model, precision: str) -> nn.Module:
    """A copy of ``model.text_encoder`` running in ``precision`` (float32 outputs in every case)."""
    if precision not in TEXT_PRECISIONS:
        raise ValueError(f"text precision must be one of {', '.join(TEXT_PRECISIONS)}, got {precision!r}")
    encoder = model.text_encoder
    if precision == "float32":
        return encoder
    if model.device.type != "cpu":
        raise ValueError(f"text precision {precision} is for the CPU; the model is on {model.device}")
    if precision == "onnx":
        try:
            # torch's threads (the service: one per search worker). A session on every core measured 106 against
            # 113 ms p50 with one client, but 12.1 against 13.8 requests/s and p99 1.41 against 0.94 s with 8
            # (HAT-base, 2 cores; docs/benchmarks.md): concurrent searches then share one pool.
            return OnnxTextEncoder(encoder, torch.get_num_threads()).eval()
        except ImportError as exc:
            raise RuntimeError(f"ONNX Runtime is not installed: {exc}") from exc
    clone = copy.deepcopy(encoder)
    if precision == "bfloat16":
        return _FloatOutputs(_bf16_linears(clone), torch.bfloat16).eval()
    return _FloatOutputs(_int8_linears(clone), torch.float32).eval()


@dataclass
class PrecisionChoice:
    """What :func:`choose_text_precision` measured: per candidate median ms and relative feature error."""

    chosen: str
    ms: dict[str, float] = field(default_factory=dict)
    error: dict[str, float] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    wide_threads: int = 0  # threads of the chosen encoder's wide session (OnnxTextEncoder.widen); 0: none
    wide_ms: tuple[float, float] | None = None  # narrow and wide medians when a wide session was tried

    def describe(self) -> str:
        parts = [f"{name} {self.ms[name]:.1f} ms (err {self.error.get(name, 0.0):.1e})" for name in self.ms]
        parts += [f"{name} not used ({why})" for name, why in self.refused.items()]
        wide = ""
        if self.wide_ms is not None:
            timed = f"{self.wide_ms[1]:.1f} against {self.wide_ms[0]:.1f} ms"
            kept = f"{self.wide_threads} threads while the other search workers are idle"
            wide = f"; {kept} ({timed})" if self.wide_threads else f"; no wide session (more threads: {timed})"
        return f"text encoder {self.chosen}: " + ", ".join(parts) + wide


def _encode(model, encoder: nn.Module, texts: Sequence[str]) -> list[torch.Tensor]:
    batch = model.tokenizer(list(texts))
    with torch.inference_mode():
        feats = encoder(batch.input_ids.to(model.device), batch.attention_mask.to(model.device))
        return [proj(f) for proj, f in zip(model.text_proj, feats, strict=True)]


def _relative_error(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    worst = 0.0
    for a, b in zip(ref, got, strict=True):
        err = (a - b).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-12)
        worst = max(worst, float(err.max()))
    return worst


def _median_ms(model, encoder: nn.Module, runs: int) -> float:
    for probe in PROBES[:2]:
        _encode(model, encoder, [probe])
    times = []
    for i in range(runs):
        start = time.perf_counter()
        _encode(model, encoder, [PROBES[i % len(PROBES)]])
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def choose_text_precision(
    model, candidates: Sequence[str] = TEXT_PRECISIONS, runs: int = 7, max_error: float = MAX_FEATURE_ERROR
) -> tuple[nn.Module, PrecisionChoice]:
    """Time each candidate on one probe caption at a time; keep the fastest whose features are within
    ``max_error`` of float32's, or a more exact one within ``TIE_MARGIN`` of it (:func:`pick_precision`).
    Returns (the encoder to use, what was measured). float32 always qualifies; on a GPU nothing else is tried."""
    if model.device.type != "cpu":
        return model.text_encoder, PrecisionChoice("float32")
    reference = _encode(model, model.text_encoder, PROBES)
    choice = PrecisionChoice("float32")
    encoders = {}
    for name in dict.fromkeys(["float32", *candidates]):
        try:
            encoder = text_encoder_in(model, name)
            error = _relative_error(reference, _encode(model, encoder, PROBES))
        except Exception as exc:  # a kernel this CPU or build lacks, a model ONNX cannot export: not a candidate
            choice.refused[name] = f"{type(exc).__name__}: {exc}"[:120]
            continue
        if error > max_error:
            choice.refused[name] = f"feature error {error:.1e} > {max_error:g}"
            continue
        encoders[name] = encoder
        choice.error[name] = error
        choice.ms[name] = _median_ms(model, encoder, runs)
    choice.chosen = pick_precision(choice.ms, choice.error)
    return encoders[choice.chosen], choice


def pick_precision(ms: dict[str, float], error: dict[str, float], margin: float = TIE_MARGIN) -> str:
    """The most exact candidate among those within ``margin`` of the fastest's median (ties in error go to the
    faster). ``ms`` and ``error`` hold the candidates that passed the error bound."""
    fastest = min(ms.values())
    close = [name for name in ms if ms[name] <= fastest * (1.0 + margin)]
    return min(close, key=lambda name: (error.get(name, 0.0), ms[name]))


def use_text_precision(model, precision: str = "auto", wide_threads: int = 0) -> PrecisionChoice:
    """Set ``model``'s text encoder to ``precision`` (``auto``: :func:`choose_text_precision`), in place.
    The model's identity (its weights as loaded) is unchanged. ``wide_threads`` > the encoder's threads gives an
    ONNX Runtime encoder a second session with that many threads for :func:`wide_encoding` blocks (only
    ``onnx`` has one: torch's thread count is the process's, not a call's)."""
    if precision == "auto":
        encoder, choice = choose_text_precision(model)
    else:
        encoder, choice = text_encoder_in(model, precision), PrecisionChoice(precision)
    if isinstance(encoder, OnnxTextEncoder) and encoder.widen(wide_threads):
        choice.wide_ms = keep_wide_if_faster(model, encoder)
        choice.wide_threads = encoder.wide_threads
    model.text_encoder = encoder
    return choice


def keep_wide_if_faster(model, encoder: OnnxTextEncoder, runs: int = 7, gain: float = WIDE_GAIN) -> tuple[float, float]:
    """Time ``encoder``'s narrow and wide sessions on the probe captions (alternating, ``runs`` each); drop the
    wide session unless its median is more than ``gain`` faster. Returns (narrow, wide) medians in ms."""

    def once(probe: str) -> float:
        start = time.perf_counter()
        _encode(model, encoder, [probe])
        return (time.perf_counter() - start) * 1000.0

    narrow, wide = [], []
    with wide_encoding():
        once(PROBES[0])  # a session's first run sets up its buffers
    for i in range(runs):
        narrow.append(once(PROBES[i % len(PROBES)]))
        with wide_encoding():
            wide.append(once(PROBES[i % len(PROBES)]))
    ms = statistics.median(narrow), statistics.median(wide)
    if ms[1] > ms[0] * (1.0 - gain):
        encoder.wide, encoder.wide_threads = None, 0
    return ms
