"""HAT's alignment score: SCAN-style cross attention per level, summed over the levels.

For an image with region features ``x_r`` (``r < R``) and a caption with word features ``t_w`` (``w < n``,
``n`` counting ``[CLS]`` and ``[SEP]``), the image-to-text (i2t) score is

1. ``s[w, r] = LeakyReLU_0.1(t_w . x_r)``
2. ``s[w, :] /= ||s[w, :]||_2 + 1e-8`` (normalised over regions for each word)
3. ``a[r, w] = softmax_w(lambda * s[w, r])``
4. ``c_r = sum_w a[r, w] t_w``; ``score = mean_r cos(x_r, c_r)``.

The text-to-image (t2i) score swaps the roles of regions and words.

The implementation never forms the D-wide attended context for i2t: with ``S = X T^T`` (``[R, n]``),
``x_r . c_r = sum_w a[r, w] S[r, w]`` and ``||c_r||^2 = a_r^T G a_r`` with ``G = T T^T`` (``[n, n]``). Every
image-caption pair therefore costs one slice of a single large matrix product plus ``O(R n^2)`` work. For t2i
the context norm uses ``H = X X^T`` when ``R <= D`` (``O(n R^2)``), otherwise the context itself
(``O(n R D)``), whichever is cheaper.

Matrix products run in the dtype of the inputs (float32, float16 or bfloat16; on CPU float16 products are
done in float32 because CPU float16 GEMM is very slow); all element-wise work (softmax, norms, cosines) runs
in float32. Work is split into chunks of image-caption pairs so that peak memory stays bounded for any
``N x M``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

EPS = 1e-8
LEAKY_SLOPE = 0.1
DIRECTIONS = ("i2t", "t2i")
# Upper bound on the float32 elements of one chunk's [n_img, n_txt, R, L] score tensor (about 64 MB); the
# element-wise pipeline holds a few such tensors at once.
DEFAULT_CHUNK_ELEMENTS = 16 * 1024 * 1024


def _check_inputs(images: torch.Tensor, texts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    if images.dim() != 3:
        raise ValueError(f"images must be [N, R, D], got shape {tuple(images.shape)}")
    if texts.dim() != 3:
        raise ValueError(f"texts must be [M, L, D], got shape {tuple(texts.shape)}")
    if images.shape[-1] != texts.shape[-1]:
        raise ValueError(f"feature sizes differ: images D={images.shape[-1]}, texts D={texts.shape[-1]}")
    lengths = torch.as_tensor(lengths, device=texts.device).long().reshape(-1)
    if lengths.numel() != texts.shape[0]:
        raise ValueError(f"lengths has {lengths.numel()} entries for {texts.shape[0]} texts")
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > texts.shape[1]):
        raise ValueError(
            f"text lengths must lie in [1, {texts.shape[1]}], got min {int(lengths.min())} max {int(lengths.max())}"
        )
    return lengths


def _matmul_dtype(t: torch.Tensor) -> torch.dtype:
    if t.dtype == torch.float16 and t.device.type == "cpu":
        return torch.float32
    if t.dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return t.dtype
    return torch.float32


def region_norms(images: torch.Tensor) -> torch.Tensor:
    """L2 norm of every region feature, in float32: ``[N, R, D]`` -> ``[N, R]`` (cacheable at index time)."""
    return torch.linalg.vector_norm(images.float(), dim=-1)


def _softmax(logits: torch.Tensor, valid: torch.Tensor | None, dim: int, lambda_softmax: float) -> torch.Tensor:
    """Softmax of ``lambda * logits`` over ``dim``; ``valid`` (broadcastable bool) masks entries out.

    ``logits`` are L2-normalised similarities, so ``|lambda * logits| <= lambda``: for moderate lambda the
    exponentials cannot overflow and the max-subtraction pass of ``torch.softmax`` (slow on CPU for short
    strided rows) is skipped.
    """
    if lambda_softmax > 60:
        scaled = logits * lambda_softmax
        if valid is not None:
            scaled = scaled.masked_fill(~valid, float("-inf"))
        return torch.softmax(scaled, dim=dim)
    weights = torch.exp(logits * lambda_softmax)
    if valid is not None:
        weights = weights * valid
    return weights / weights.sum(dim=dim, keepdim=True)


def _i2t_no_grad(
    sim: torch.Tensor,
    valid: torch.Tensor,
    all_valid: bool,
    lambda_softmax: float,
    texts: torch.Tensor,
    image_norms: torch.Tensor,
    text_gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """The i2t pipeline of :func:`_pair_scores` with in-place steps (inference: no graph to keep)."""
    act = F.leaky_relu(sim, LEAKY_SLOPE)
    if not all_valid:
        act.mul_(valid)
    # ||act[:, :, j, w]|| over the regions as a sum of squares: linalg.vector_norm over this strided middle
    # dimension measured ~10x slower ([100, 64, 1, 18]: 374 against 35 us), the same values to rounding.
    act.div_(act.square().sum(dim=1, keepdim=True).sqrt_().add_(EPS))
    attn = _softmax_(act, None if all_valid else valid, 3, lambda_softmax)
    dots = (attn * sim).sum(dim=3)  # [n, R, m]
    gram = (texts @ texts.transpose(1, 2)).float() if text_gram is None else text_gram  # [m, L, L]
    ctx = torch.einsum("irjw,jwv->irjv", attn, gram)
    ctx_sq = ctx.mul_(attn).sum(dim=3).clamp_min_(0).sqrt_()
    cos = dots.div_(ctx_sq.mul_(image_norms[:, :, None]).clamp_min_(EPS))
    return cos.mean(dim=1)


def _softmax_(logits: torch.Tensor, valid: torch.Tensor | None, dim: int, lambda_softmax: float) -> torch.Tensor:
    """In-place :func:`_softmax` (overwrites ``logits``)."""
    if lambda_softmax > 60:
        return _softmax(logits, valid, dim, lambda_softmax)
    weights = logits.mul_(lambda_softmax).exp_()
    if valid is not None:
        weights.mul_(valid)
    return weights.div_(weights.sum(dim=dim, keepdim=True))


def _pair_scores(
    images: torch.Tensor,
    texts: torch.Tensor,
    lengths: torch.Tensor,
    lambda_softmax: float,
    direction: str,
    image_norms: torch.Tensor,
    text_gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scores of one chunk: images ``[n, R, D]`` x texts ``[m, L, D]`` -> ``[n, m]`` float32.

    Intermediate tensors are laid out ``[n, R, m, L]``: the layout the single matrix product produces, so
    nothing is permuted or copied.
    """
    n, regions, dim = images.shape
    m, words, _ = texts.shape
    mm_dtype = _matmul_dtype(images)
    xi = images.to(mm_dtype)
    tt = texts.to(mm_dtype)
    # S[i, r, j, w] = x_r(i) . t_w(j): one [n*R, D] x [D, m*L] product for the whole chunk.
    sim = (xi.reshape(n * regions, dim) @ tt.reshape(m * words, dim).T).float().view(n, regions, m, words)
    valid = (torch.arange(words, device=texts.device)[None, :] < lengths[:, None])[None, None]  # [1, 1, m, L]
    all_valid = bool(valid.all())
    if direction == "i2t" and not (torch.is_grad_enabled() and (images.requires_grad or texts.requires_grad)):
        return _i2t_no_grad(sim, valid, all_valid, lambda_softmax, tt, image_norms, text_gram)
    act = F.leaky_relu(sim, LEAKY_SLOPE)
    if not all_valid:
        act = act * valid
    if direction == "i2t":
        # Normalise over regions for each word, softmax over the caption's words.
        act = act / (torch.linalg.vector_norm(act, dim=1, keepdim=True) + EPS)
        attn = _softmax(act, None if all_valid else valid, 3, lambda_softmax)
        dots = (attn * sim).sum(dim=3)  # [n, R, m] = x_r . c_r
        gram = (tt @ tt.transpose(1, 2)).float() if text_gram is None else text_gram  # [m, L, L]
        ctx_sq = (torch.einsum("irjw,jwv->irjv", attn, gram) * attn).sum(dim=3)  # a_r^T G a_r
        cos = dots / (image_norms[:, :, None] * ctx_sq.clamp_min(0).sqrt()).clamp_min(EPS)
        return cos.mean(dim=1)
    # t2i: normalise over words for each region, softmax over regions.
    act = act / (torch.linalg.vector_norm(act, dim=3, keepdim=True) + EPS)
    attn = _softmax(act, None, 1, lambda_softmax)  # [n, R, m, L], sums to 1 over R
    dots = (attn * sim).sum(dim=1)  # [n, m, L] = t_w . c_w
    flat = attn.reshape(n, regions, m * words)
    if regions <= dim:
        gram = (xi @ xi.transpose(1, 2)).float()  # [n, R, R]
        ctx_sq = ((gram @ flat) * flat).sum(dim=1)  # [n, m*L]
    else:
        ctx = flat.transpose(1, 2).to(mm_dtype) @ xi  # [n, m*L, D]
        ctx_sq = torch.linalg.vector_norm(ctx.float(), dim=2).square()
    text_norms = torch.linalg.vector_norm(texts.float(), dim=2)  # [m, L]
    cos = dots / (text_norms[None] * ctx_sq.view(n, m, words).clamp_min(0).sqrt()).clamp_min(EPS)
    if not all_valid:
        cos = cos * valid[0]
    return cos.sum(dim=2) / lengths[None].float()


def _scan(
    images: torch.Tensor,
    texts: torch.Tensor,
    lengths: torch.Tensor,
    lambda_softmax: float,
    direction: str,
    image_norms: torch.Tensor | None,
    chunk_elements: int,
    text_gram: torch.Tensor | None = None,
) -> torch.Tensor:
    lengths = _check_inputs(images, texts, lengths)
    n, regions, _ = images.shape
    m = texts.shape[0]
    out = torch.empty(n, m, dtype=torch.float32, device=images.device)
    if text_gram is not None:  # images are then features whose dot products with the texts are the true ones
        words = texts.shape[1]
        if tuple(text_gram.shape) != (m, words, words):
            raise ValueError(f"text_gram must be [{m}, {words}, {words}], got {tuple(text_gram.shape)}")
        if image_norms is None or direction != "i2t":
            raise ValueError("text_gram is for i2t scores with cached image_norms")
        text_gram = text_gram.float()
    if n == 0 or m == 0:
        return out
    if image_norms is None:
        image_norms = region_norms(images)
    elif tuple(image_norms.shape) != (n, regions):
        raise ValueError(f"image_norms must be [{n}, {regions}], got {tuple(image_norms.shape)}")
    image_norms = image_norms.float()
    # Sort captions by length so that each text chunk is truncated to a tight common length.
    order = torch.argsort(lengths.cpu(), descending=True).to(texts.device)
    sorted_lengths = lengths[order]
    max_len = int(sorted_lengths[0])
    per_pair = regions * max_len
    text_chunk = max(1, min(m, chunk_elements // per_pair))
    image_chunk = max(1, min(n, chunk_elements // (per_pair * text_chunk)))
    for j0 in range(0, m, text_chunk):
        idx = order[j0 : j0 + text_chunk]
        chunk_len = int(sorted_lengths[j0])
        t_chunk = texts[idx, :chunk_len]
        l_chunk = sorted_lengths[j0 : j0 + text_chunk]
        for i0 in range(0, n, image_chunk):
            i1 = i0 + image_chunk
            g_chunk = None if text_gram is None else text_gram[idx, :chunk_len, :chunk_len]
            out[i0:i1, idx] = _pair_scores(
                images[i0:i1], t_chunk, l_chunk, lambda_softmax, direction, image_norms[i0:i1], g_chunk
            )
    return out


def scan_i2t(
    images: torch.Tensor,
    texts: torch.Tensor,
    lengths: torch.Tensor | Sequence[int],
    lambda_softmax: float = 9.0,
    *,
    image_norms: torch.Tensor | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    text_gram: torch.Tensor | None = None,
) -> torch.Tensor:
    """Image-to-text SCAN scores (regions attend over words, mean over regions).

    Args:
        images: region features ``[N, R, D]``.
        texts: word features ``[M, L, D]``; positions at or after ``lengths[j]`` are ignored.
        lengths: ``[M]`` valid tokens per caption, counting ``[CLS]`` and ``[SEP]``.
        lambda_softmax: inverse softmax temperature (HAT: 9).
        image_norms: optional cached ``region_norms(images)`` ``[N, R]``.
        chunk_elements: bound on the elements of one chunk's ``[n, m, R, L]`` tensor.
        text_gram: optional ``[M, L, L]`` Gram matrices ``T T^T`` of the captions. With it (and ``image_norms``),
            ``images`` and ``texts`` need only give the right dot products ``x_r . t_w``, not be the features
            themselves: e.g. a compressed store's coded axes only, plus one column for what the uncoded axes add
            (``index_format.store``), which makes the product narrower than ``D``.

    Returns:
        ``[N, M]`` float32 scores.
    """
    return _scan(
        images, texts, torch.as_tensor(lengths), lambda_softmax, "i2t", image_norms, chunk_elements, text_gram
    )


def scan_i2t_dots(
    dots: torch.Tensor,
    lengths: torch.Tensor | Sequence[int],
    lambda_softmax: float = 9.0,
    *,
    image_norms: torch.Tensor,
    text_gram: torch.Tensor,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Image-to-text SCAN scores from the dot products alone: what :func:`scan_i2t` computes from features,
    given ``dots [N, R, M, L]`` (``x_r(i) . t_w(j)``), the region norms ``image_norms [N, R]`` and the captions'
    Gram matrices ``text_gram [M, L, L]``: the i2t score needs nothing else of the image (module docstring).
    A compressed store computes the dot products from its codes without decoding them
    (``index_format.store.PCADecoder.dots``). Returns ``[N, M]`` float32."""
    if dots.dim() != 4:
        raise ValueError(f"dots must be [N, R, M, L], got shape {tuple(dots.shape)}")
    n, regions, m, words = dots.shape
    lengths = torch.as_tensor(lengths, device=dots.device).long().reshape(-1)
    if lengths.numel() != m or (m and (int(lengths.min()) < 1 or int(lengths.max()) > words)):
        raise ValueError(f"lengths must give {m} values in [1, {words}], got {lengths.tolist()}")
    if tuple(image_norms.shape) != (n, regions):
        raise ValueError(f"image_norms must be [{n}, {regions}], got {tuple(image_norms.shape)}")
    if tuple(text_gram.shape) != (m, words, words):
        raise ValueError(f"text_gram must be [{m}, {words}, {words}], got {tuple(text_gram.shape)}")
    out = torch.empty(n, m, dtype=torch.float32, device=dots.device)
    if n == 0 or m == 0:
        return out
    valid = (torch.arange(words, device=dots.device)[None, :] < lengths[:, None])[None, None]  # [1, 1, m, L]
    all_valid = bool(valid.all())
    step = max(1, chunk_elements // (regions * m * words))
    norms, gram = image_norms.float(), text_gram.float()
    with torch.no_grad():
        for i0 in range(0, n, step):
            sim = dots[i0 : i0 + step].float()
            out[i0 : i0 + step] = _i2t_no_grad(sim, valid, all_valid, lambda_softmax, None, norms[i0 : i0 + step], gram)
    return out


def scan_t2i(
    images: torch.Tensor,
    texts: torch.Tensor,
    lengths: torch.Tensor | Sequence[int],
    lambda_softmax: float = 9.0,
    *,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Text-to-image SCAN scores (words attend over regions, mean over the caption's words).

    Shapes as :func:`scan_i2t`; returns ``[N, M]`` float32 scores.
    """
    return _scan(images, texts, torch.as_tensor(lengths), lambda_softmax, "t2i", None, chunk_elements)


def scan(
    images: torch.Tensor,
    texts: torch.Tensor,
    lengths: torch.Tensor | Sequence[int],
    lambda_softmax: float = 9.0,
    direction: str = "i2t",
    **kwargs,
) -> torch.Tensor:
    """SCAN scores ``[N, M]`` in ``direction`` (``"i2t"`` or ``"t2i"``)."""
    if direction == "i2t":
        return scan_i2t(images, texts, lengths, lambda_softmax, **kwargs)
    if direction == "t2i":
        kwargs.pop("image_norms", None)
        return scan_t2i(images, texts, lengths, lambda_softmax, **kwargs)
    raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def level_similarities(
    image_levels: Sequence[torch.Tensor], text_levels: Sequence[torch.Tensor], text_lengths, lambda_softmax=9.0,
    direction="i2t", *, image_norms: Sequence[torch.Tensor] | None = None, chunk_elements=DEFAULT_CHUNK_ELEMENTS,
    text_grams: Sequence[torch.Tensor | None] | None = None,
    image_dots: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:  # fmt: skip
    """The per-level SCAN scores that HAT sums: one ``[N, M]`` float32 tensor per level, fine to coarse.

    Arguments as :func:`hierarchical_similarity`; ``text_grams``: per level ``None`` or the captions' Gram
    matrices (i2t with ``image_norms`` only; see :func:`scan_i2t`). ``image_dots``: per level ``None`` or the dot
    products ``[N, R, M, L]`` of the images' regions with the captions' words, which then stand for that level's
    image features (i2t with ``image_norms`` and ``text_grams``; see :func:`scan_i2t_dots`).
    """
    if len(image_levels) != len(text_levels) or not image_levels:
        raise ValueError(f"need the same non-zero number of levels, got {len(image_levels)} and {len(text_levels)}")
    scores = []
    for level, (img, txt) in enumerate(zip(image_levels, text_levels, strict=True)):
        if image_dots is not None and image_dots[level] is not None:
            if direction != "i2t" or image_norms is None or text_grams is None or text_grams[level] is None:
                raise ValueError("image_dots are for i2t scores with image_norms and text_grams")
            scores.append(scan_i2t_dots(
                image_dots[level], text_lengths, lambda_softmax, image_norms=image_norms[level],
                text_gram=text_grams[level], chunk_elements=chunk_elements,
            ))  # fmt: skip
            continue
        extra = {"image_norms": image_norms[level]} if (image_norms is not None and direction == "i2t") else {}
        if text_grams is not None and text_grams[level] is not None:
            extra["text_gram"] = text_grams[level]
        scores.append(scan(img, txt, text_lengths, lambda_softmax, direction, chunk_elements=chunk_elements, **extra))
    return scores


def sum_levels(scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The sum of per-level scores, added in level order (the order :func:`hierarchical_similarity` uses)."""
    total = scores[0]
    for score in scores[1:]:
        total = total + score
    return total


def hierarchical_similarity(
    image_levels: Sequence[torch.Tensor],
    text_levels: Sequence[torch.Tensor],
    text_lengths: torch.Tensor | Sequence[int],
    lambda_softmax: float = 9.0,
    direction: str = "i2t",
    *,
    image_norms: Sequence[torch.Tensor] | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> torch.Tensor:
    """HAT's score: the per-level SCAN scores summed over levels.

    Args:
        image_levels: per level ``[N, R_l, D]``, fine to coarse.
        text_levels: per level ``[M, L, D]``, paired with ``image_levels`` in order.
        text_lengths: ``[M]`` valid tokens per caption.
        image_norms: optional cached per-level ``[N, R_l]`` region norms (i2t only).

    Returns:
        ``[N, M]`` float32.
    """
    levels = (image_levels, text_levels, text_lengths, lambda_softmax, direction)
    return sum_levels(level_similarities(*levels, image_norms=image_norms, chunk_elements=chunk_elements))


class LevelAttention(NamedTuple):
    """One image-caption pair's cross attention at one level (:func:`level_attention`).

    ``weights``: the softmax weights exactly as the score uses them: i2t ``[R, n]`` (each region's weights over
    the words sum to 1), t2i ``[n, R]`` (each word's weights over the regions sum to 1).
    ``word_maps``: ``[n, R]``, for each word a distribution over the regions: t2i the weights themselves; i2t
    the word's column of the weights divided by its sum over the regions (the share of the attention the word
    receives that comes from each region).
    ``score``: the level's SCAN score recomputed from ``weights`` (float32).
    """

    weights: torch.Tensor
    word_maps: torch.Tensor
    score: float


def level_attention(
    image: torch.Tensor,
    text: torch.Tensor,
    lambda_softmax: float = 9.0,
    direction: str = "i2t",
    image_norms: torch.Tensor | None = None,
) -> LevelAttention:
    """HAT's cross attention between one image's regions ``[R, D]`` and one caption's valid tokens ``[n, D]``
    (``[CLS]`` and ``[SEP]`` included), in float32: the weights of steps 1-3 of the module docstring and the
    score of step 4 computed from them, with the attended context formed explicitly. ``image_norms [R]``: the
    region norms the i2t score divides by, when cached (as :func:`scan_i2t` takes them)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    x, t = image.float(), text.float()
    act = F.leaky_relu(t @ x.T, LEAKY_SLOPE)  # [n, R]
    if direction == "i2t":
        act = act / (torch.linalg.vector_norm(act, dim=1, keepdim=True) + EPS)  # over the regions, per word
        weights = torch.softmax(lambda_softmax * act.T, dim=1)  # [R, n], over the words
        context = weights @ t  # [R, D]
        norms = region_norms(x[None])[0] if image_norms is None else image_norms.float()
        score = ((x * context).sum(dim=1) / (norms * context.norm(dim=1)).clamp_min(EPS)).mean()
        word_maps = weights.T / weights.T.sum(dim=1, keepdim=True).clamp_min(EPS)
        return LevelAttention(weights, word_maps, float(score))
    act = act / (torch.linalg.vector_norm(act, dim=0, keepdim=True) + EPS)  # over the words, per region
    weights = torch.softmax(lambda_softmax * act, dim=1)  # [n, R], over the regions
    context = weights @ x  # [n, D]
    score = F.cosine_similarity(t, context, dim=1, eps=EPS).mean()
    return LevelAttention(weights, weights, float(score))
