"""A generated image-caption world in the Flickr30K Karpathy format.

Scenes hold two or three coloured shapes of two sizes on a plain background. Each image gets five captions
from different templates, synonyms and word orders, with spatial relations stated both ways. About a third
of the scenes have a "twin" right after them that differs only in which colour goes with which shape, or in
which object is where, so that the gallery holds near-duplicates that a bag of words cannot tell apart.

``python -m training.synthetic --out DIR --seed N [--train N --val N --test N] [--size PX]`` writes
``DIR/dataset.json`` (Karpathy format: ``images[].filename/split/sentences[].raw``) and
``DIR/images/*.png``. Output is a pure function of the arguments (same seed, same bytes).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from PIL import Image, ImageDraw

from model import CommandParser

COLOURS = {
    "red": (220, 30, 35),
    "green": (35, 160, 60),
    "blue": (35, 70, 225),
    "yellow": (240, 205, 25),
    "purple": (135, 50, 175),
    "orange": (250, 135, 25),
    "black": (25, 25, 25),
    "pink": (245, 120, 190),
}
SHAPES = {
    "circle": ["circle", "disc", "round dot"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "triangle"],
    "star": ["star", "star shape"],
    "diamond": ["diamond", "rhombus"],
    "hexagon": ["hexagon", "hexagon"],
}
SIZES = {"small": ["small", "little", "tiny"], "large": ["large", "big", "huge"]}
BACKGROUNDS = [(245, 245, 240), (225, 225, 225), (240, 232, 215), (215, 230, 240)]
RELATIONS = {  # relation of A to B -> (phrases, inverse relation)
    "left": (["to the left of", "left of", "on the left of"], "right"),
    "right": (["to the right of", "right of", "on the right of"], "left"),
    "above": (["above", "over", "on top of"], "below"),
    "below": (["below", "under", "beneath"], "above"),
}
SPLIT_DEFAULTS = {"train": 29000, "val": 1014, "test": 1000}  # Flickr30K's Karpathy split sizes


@dataclass(frozen=True)
class WorldSpec:
    """Which colours and shapes scenes use, how big the two sizes are, and the least gap between objects.

    The default is the original world; ``--colours``, ``--shapes``, ``--radii`` and ``--gap`` change it.
    """

    colours: tuple[str, ...] = tuple(COLOURS)
    shapes: tuple[str, ...] = tuple(SHAPES)
    radii: tuple[float, float] = (0.085, 0.15)  # small, large: fractions of the canvas
    gap: float = 0.1  # least distance between two objects' outlines (their bounding circles), as a fraction

    def __post_init__(self) -> None:
        unknown = sorted(set(self.colours) - set(COLOURS)) + sorted(set(self.shapes) - set(SHAPES))
        if unknown:
            raise ValueError(f"unknown colours or shapes {unknown}")
        if len(self.colours) < 3 or len(self.shapes) < 3:
            raise ValueError("a world needs at least 3 colours and 3 shapes (scenes hold up to 3 objects)")
        if not 0 < self.radii[0] < self.radii[1] <= 0.18:
            raise ValueError(f"radii must satisfy 0 < small < large <= 0.18, got {self.radii}")

    def radius(self, size: str) -> float:
        return self.radii[0] if size == "small" else self.radii[1]


DEFAULT_WORLD = WorldSpec()


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str
    x: float  # centre, as a fraction of the canvas
    y: float


def _radius(size: str, canvas: int, world: WorldSpec = DEFAULT_WORLD) -> float:
    return canvas * world.radius(size)


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        r *= 0.88
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "hexagon":
        return [(cx + r * math.cos(k * math.pi / 3), cy + r * math.sin(k * math.pi / 3)) for k in range(6)]
    if shape == "star":
        return [
            (
                cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5),
            )
            for k in range(10)
        ]
    raise ValueError(f"unknown shape {shape!r}")


def draw_scene(
    things: list[Thing], canvas: int, background: tuple[int, int, int], world: WorldSpec = DEFAULT_WORLD
) -> Image.Image:
    """Render a scene as an RGB image of ``canvas`` x ``canvas`` pixels."""
    image = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    for t in things:
        cx, cy, r = t.x * canvas, t.y * canvas, _radius(t.size, canvas, world)
        if t.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLOURS[t.colour])
        else:
            draw.polygon(_polygon(t.shape, cx, cy, r), fill=COLOURS[t.colour])
    return image


def _place(rng: random.Random, count: int, world: WorldSpec = DEFAULT_WORLD) -> list[tuple[float, float, str]]:
    """Non-overlapping centres (fractions) with sizes, kept inside the centre crop's margin."""
    while True:
        spots: list[tuple[float, float, str]] = []
        for _ in range(count):
            size = rng.choice(list(SIZES))
            for _attempt in range(50):
                x, y = rng.uniform(0.24, 0.76), rng.uniform(0.24, 0.76)
                if all(
                    math.hypot(x - a, y - b) > world.gap + world.radius(s) + world.radius(size) for a, b, s in spots
                ):
                    spots.append((x, y, size))
                    break
        if len(spots) == count:
            return spots


def relation(a: Thing, b: Thing) -> str:
    """Where ``a`` is relative to ``b``: the dominant axis of their offset."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def random_scene(rng: random.Random, world: WorldSpec = DEFAULT_WORLD) -> list[Thing]:
    count = 2 if rng.random() < 0.6 else 3
    shapes = rng.sample(list(world.shapes), count)
    colours = rng.sample(list(world.colours), count)
    places = _place(rng, count, world)
    return [Thing(s, c, z, x, y) for s, c, (x, y, z) in zip(shapes, colours, places, strict=True)]


def twin(rng: random.Random, scene: list[Thing]) -> list[Thing]:
    """A near-duplicate: colours swapped between two shapes, or two objects' positions swapped."""
    i, j = rng.sample(range(len(scene)), 2)
    a, b = scene[i], scene[j]
    out = list(scene)
    if rng.random() < 0.5:
        out[i], out[j] = replace(a, colour=b.colour), replace(b, colour=a.colour)
    else:
        out[i], out[j] = replace(a, x=b.x, y=b.y, size=b.size), replace(b, x=a.x, y=a.y, size=a.size)
    return out


def _np(rng: random.Random, t: Thing, with_size: bool) -> str:
    words = [rng.choice(SIZES[t.size])] if with_size else []
    return " ".join(["a", *words, t.colour, rng.choice(SHAPES[t.shape])])


def captions(rng: random.Random, scene: list[Thing]) -> list[str]:
    """Five different captions for one scene."""
    a, b = rng.sample(scene, 2)
    rel = relation(a, b)
    phrase, inverse = rng.choice(RELATIONS[rel][0]), RELATIONS[rel][1]
    others = [t for t in scene if t not in (a, b)]
    extra = f", and {_np(rng, others[0], True)} is also there" if others else ""
    listing = ", ".join(_np(rng, t, rng.random() < 0.5) for t in scene)
    shape_b = rng.choice(SHAPES[b.shape])
    out = [
        f"{_np(rng, a, True)} {phrase} {_np(rng, b, True)}{extra}",
        f"{_np(rng, b, rng.random() < 0.5)} {rng.choice(RELATIONS[inverse][0])} {_np(rng, a, False)}",
        f"{rng.choice(['there is', 'we see', 'the picture shows'])} {listing}",
        f"the {rng.choice(SHAPES[a.shape])} is {a.colour} and the {shape_b} is {b.colour}, "
        f"the {a.shape} being {rng.choice(RELATIONS[rel][0])} the {b.shape}",
        f"{len(scene)} shapes on a plain background: {listing}",
    ]
    return [c[0].upper() + c[1:] + "." for c in out]


def iter_world(seed: int, splits: dict[str, int], world: WorldSpec = DEFAULT_WORLD):
    """The world's scenes in order, without drawing them: ``(split, index, things, background, captions)``.

    ``generate`` draws exactly these, so analyses (e.g. which images a caption is consistent with) can replay
    a generated world from its seed.
    """
    rng = random.Random(seed)
    previous = None
    for split, count in splits.items():
        for index in range(count):
            if previous is not None and rng.random() < 0.35:
                scene, previous = twin(rng, previous), None
            else:
                scene = previous = random_scene(rng, world)
            background = rng.choice(BACKGROUNDS)
            yield split, index, scene, background, captions(rng, scene)


def generate(out: Path, seed: int, splits: dict[str, int], canvas: int = 146, world: WorldSpec = DEFAULT_WORLD) -> Path:
    """Write the world to ``out``; returns the path of ``dataset.json``."""
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    records, sentid = [], 0
    for split, index, scene, background, texts in iter_world(seed, splits, world):
        name = f"{split}_{index:05d}.png"
        draw_scene(scene, canvas, background, world).save(images_dir / name, optimize=False)
        sentences = []
        for raw in texts:
            sentences.append(
                {
                    "raw": raw,
                    "tokens": raw.lower().rstrip(".").replace(",", "").split(),
                    "imgid": len(records),
                    "sentid": sentid,
                }
            )
            sentid += 1
        records.append(
            {
                "filename": name,
                "split": split,
                "imgid": len(records),
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
            }
        )
    path = out / "dataset.json"
    head = {"dataset": "hat-synthetic", "seed": seed}
    if world != DEFAULT_WORLD:
        head["world"] = {f: list(v) if isinstance(v, tuple) else v for f, v in vars(world).items()}
    path.write_text(json.dumps({**head, "images": records}))
    write_gallery_manifest(records, out / "manifest.jsonl")
    return path


def write_gallery_manifest(records: list[dict], path: Path) -> None:
    """The same scenes as a gallery manifest for ``python -m index_builder`` (one JSON object per line)."""
    with open(path, "w") as fh:
        for r in records:
            item = {
                "id": r["filename"].rsplit(".", 1)[0],
                "image": f"images/{r['filename']}",
                "captions": [s["raw"] for s in r["sentences"]],
                "metadata": {"split": r["split"]},
            }
            fh.write(json.dumps(item) + "\n")


def add_world_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULT_WORLD
    parser.add_argument("--colours", default=",".join(d.colours), help="comma-separated subset of the colours")
    parser.add_argument("--shapes", default=",".join(d.shapes), help="comma-separated subset of the shapes")
    parser.add_argument("--radii", default=f"{d.radii[0]},{d.radii[1]}", help="small,large radius (canvas fractions)")
    parser.add_argument("--gap", type=float, default=d.gap, help="least gap between objects (canvas fraction)")


def world_from_arguments(args: argparse.Namespace) -> WorldSpec:
    radii = tuple(float(r) for r in args.radii.split(","))
    if len(radii) != 2:
        raise ValueError(f"--radii takes two numbers, got {args.radii!r}")
    return WorldSpec(tuple(args.colours.split(",")), tuple(args.shapes.split(",")), radii, args.gap)


EXAMPLES = (
    "python -m training.synthetic --out data/world --seed 0 --train 10000 --val 1014 --test 1000",
    "python -m training.synthetic --out data/demo-gallery --seed 1 --train 0 --val 0 --test 1000",
)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m training.synthetic``."""
    parser = CommandParser(prog="python -m training.synthetic", description=__doc__, examples=EXAMPLES)
    parser.add_argument("--out", required=True, type=Path, help="output folder (dataset.json, manifest.jsonl, images/)")
    parser.add_argument("--seed", type=int, default=0, help="the world's seed: same seed and options, same bytes")
    for split, count in SPLIT_DEFAULTS.items():
        parser.add_argument(f"--{split}", type=int, default=count, help=f"images in the {split} split")
    parser.add_argument("--size", type=int, default=146, help="canvas side in pixels")
    add_world_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    splits = {s: getattr(args, s) for s in SPLIT_DEFAULTS}
    if any(n < 0 for n in splits.values()):
        parser.error("split sizes must be non-negative")
    try:
        world = world_from_arguments(args)
    except ValueError as exc:
        parser.error(str(exc))
    path = generate(args.out, args.seed, splits, args.size, world)
    print(
        f"wrote {path} and {path.parent / 'manifest.jsonl'} ({sum(splits.values())} images, "
        f"{5 * sum(splits.values())} captions)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
