"""The ceiling of text->image R@1 on a generated world: how many images each caption is consistent with.

    python benchmarks/world_oracle.py --seed 0 --train 10000 --val 1014 --test 1000 --split test [--limit N]

Replays the world from its seed (``training.synthetic.iter_world``), parses every caption of the split back into
what it states (objects with colour, shape and maybe size; one spatial relation; maybe the object count) and
counts, per caption, the images of the split whose scene satisfies all of it (relations by the generator's
own rule, ``training.synthetic.relation``). An oracle that knows exactly what the captions state and breaks ties
at random gets R@1 = mean(1 / k) over captions, where k counts the consistent images (k >= 1: its own).

Two readings: ``literal`` (a listing or a relation says nothing about other objects unless a count is
given) and ``generator`` (knows the templates: a listing names every object, and the first template
names a third object whenever there is one).
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from dataclasses import dataclass

from training.synthetic import (
    COLOURS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLIT_DEFAULTS,
    Thing,
    add_world_arguments,
    iter_world,
    relation,
    world_from_arguments,
)

SHAPE_OF = {syn: shape for shape, syns in SHAPES.items() for syn in syns}
SIZE_OF = {syn: size for size, syns in SIZES.items() for syn in syns}
REL_OF = {phrase: rel for rel, (phrases, _) in RELATIONS.items() for phrase in phrases}
_alt = lambda words: "|".join(sorted(map(re.escape, words), key=len, reverse=True))  # noqa: E731
NP = rf"a (?:({_alt(SIZE_OF)}) )?({_alt(COLOURS)}) ({_alt(SHAPE_OF)})"
NP_RE = re.compile(NP)
REL = rf"({_alt(REL_OF)})"
T_REL = re.compile(rf"^{NP} {REL} {NP}(?:, and {NP} is also there)?$")
T_LIST = re.compile(r"^(?:there is|we see|the picture shows) (.*)$")
T_PAIR = re.compile(
    rf"^the ({_alt(SHAPE_OF)}) is ({_alt(COLOURS)}) and the ({_alt(SHAPE_OF)}) is ({_alt(COLOURS)}), "
    rf"the (\w+) being {REL} the (\w+)$"
)
T_COUNT = re.compile(r"^(\d) shapes on a plain background: (.*)$")


@dataclass(frozen=True)
class Claim:
    """What one caption states: object descriptions, relations between two of them, a count."""

    objects: tuple[tuple[str | None, str, str], ...]  # (size or None, colour, shape)
    relations: tuple[tuple[int, str, int], ...] = ()  # (object i, relation, object j)
    count: int | None = None  # exact number of objects, when stated (or implied, generator reading)


def _nps(text: str) -> tuple[tuple[str | None, str, str], ...]:
    found = NP_RE.findall(text)
    if ", ".join(f"a {' '.join(w for w in m if w)}" for m in found) != text:
        raise ValueError(f"not a listing: {text!r}")
    return tuple((SIZE_OF.get(size), colour, SHAPE_OF[shape]) for size, colour, shape in found)


def parse(caption: str, generator: bool) -> Claim:
    text = caption.rstrip(".")
    text = text[0].lower() + text[1:]
    if m := T_REL.match(text):
        g = m.groups()
        objs = [(SIZE_OF.get(g[0]), g[1], SHAPE_OF[g[2]]), (SIZE_OF.get(g[4]), g[5], SHAPE_OF[g[6]])]
        if g[8]:
            objs.append((SIZE_OF.get(g[7]), g[8], SHAPE_OF[g[9]]))
        count = len(objs) if generator and g[8] else None
        # Generator reading: the first template (sizes on both) names the third object when there is one.
        if generator and not g[8] and g[0] and g[4]:
            count = 2
        return Claim(tuple(objs), ((0, REL_OF[g[3]], 1),), count)
    if m := T_COUNT.match(text):
        return Claim(_nps(m.group(2)), (), int(m.group(1)))
    if m := T_LIST.match(text):
        objs = _nps(m.group(1))
        return Claim(objs, (), len(objs) if generator else None)
    if m := T_PAIR.match(text):
        g = m.groups()
        objs = ((None, g[1], SHAPE_OF[g[0]]), (None, g[3], SHAPE_OF[g[2]]))
        first = 0 if SHAPE_OF.get(g[4], g[4]) == objs[0][2] else 1
        return Claim(objs, ((first, REL_OF[g[5]], 1 - first),), None)
    raise ValueError(f"caption matches no template: {caption!r}")


def consistent(claim: Claim, scene: list[Thing]) -> bool:
    """Whether some assignment of the claim's objects to distinct objects of ``scene`` satisfies it."""
    if claim.count is not None and claim.count != len(scene):
        return False
    for picked in itertools.permutations(scene, len(claim.objects)):
        if all(
            t.colour == colour and t.shape == shape and (size is None or t.size == size)
            for (size, colour, shape), t in zip(claim.objects, picked, strict=True)
        ) and all(relation(picked[i], picked[j]) == rel for i, rel, j in claim.relations):
            return True
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    for split, count in SPLIT_DEFAULTS.items():
        parser.add_argument(f"--{split}", type=int, default=count)
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images of the split")
    add_world_arguments(parser)
    args = parser.parse_args(argv)
    splits = {s: getattr(args, s) for s in SPLIT_DEFAULTS}
    spec = world_from_arguments(args)
    world = [(scene, caps) for split, _, scene, _, caps in iter_world(args.seed, splits, spec) if split == args.split]
    if args.limit:
        world = world[: args.limit]
    print(f"{args.split}: {len(world)} images, {5 * len(world)} captions")
    for reading in ("literal", "generator"):
        per_template = [[] for _ in range(5)]
        for owner, (_, caps) in enumerate(world):
            for t, caption in enumerate(caps):
                claim = parse(caption, reading == "generator")
                k = sum(consistent(claim, scene) for scene, _ in world)
                if not consistent(claim, world[owner][0]):
                    raise AssertionError(f"caption inconsistent with its own image: {caption!r}")
                per_template[t].append(k)
        ks = [k for row in per_template for k in row]
        r1 = 100 * sum(1 / k for k in ks) / len(ks)
        unique = 100 * sum(k == 1 for k in ks) / len(ks)
        r5 = 100 * sum(min(1.0, 5 / k) for k in ks) / len(ks)
        by_t = ", ".join(f"t{t}: {100 * sum(1 / k for k in row) / len(row):.1f}" for t, row in enumerate(per_template))
        print(
            f"{reading:>9}: oracle t2i R@1 {r1:.2f} (unique {unique:.2f}%, R@5 {r5:.2f}, "
            f"mean k {sum(ks) / len(ks):.2f}, max k {max(ks)}); R@1 by template: {by_t}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
