"""`shapes` phrases: enumerate the unambiguous descriptions of a target, pick one, word it.

Phrases are built from the scene metadata, never parsed back, and checked unique by
construction with pixel margins so the geometry is unambiguous:
  - attr:      a unique description ("the small red circle", "the triangle").
  - absolute:  a description that several objects share, plus the extreme one in a direction
               ("the red circle on the left", "the top square", "the lower blue cross").
  - direction: a shared description, plus a side of a uniquely described reference object;
               exactly one match lies on that side, the others on the other side or level with
               it ("the small red circle left of the blue square", "the triangle above the
               green circle").
  - nearest:   a shared description, plus "next to"/"near"/"closest to" a reference; the target
               is clearly the closest match ("the square next to the yellow cross").
Sizes are absolute classes (every dataset holds both), "left"/"right" only appear as whole words
so the horizontal-flip word swap stays correct, and phrases stay within MAX_WORDS (10) words
(the tiny recipe's max_query_len of 12 with [CLS]/[SEP]). The target is picked uniformly among
the objects that can be described, so "which object is the target" carries no phrase-free
signal (the phrase-blind baselines in tests/test_shapes.py check it).

Known shortcuts (they need the phrase, but not the reference): a direction phrase's target is
the extreme match on the named side, since every other match lies level with the reference or
beyond it; and the margins that make a nearest phrase clear push the other matches away from
the reference, often towards the border, so the target is often the match nearest the image
centre. The "relational" train mix drops most of those from training (see spec.TRAIN_DECENTRE).
"""

from __future__ import annotations

import math

import numpy as np

from vgdistill.data.shapes.spec import (
    MAX_WORDS,
    TRAIN_DECENTRE,
    TRAIN_NEAREST_FIRST,
    TRAIN_RELATION_SHARE,
    ShapeObject,
)

_SIZE_WORDS = {"small": ("small", "small", "little"), "large": ("large", "large", "big")}
# Descriptions always name the shape; colour and size are optional qualifiers.
_DESCRIPTORS: tuple[tuple[str, ...], ...] = (
    ("shape",),
    ("colour", "shape"),
    ("size", "shape"),
    ("size", "colour", "shape"),
)
_ABSOLUTE_TEMPLATES = {
    "left": ("the {d} on the left", "the left {d}"),
    "right": ("the {d} on the right", "the right {d}"),
    "top": ("the {d} at the top", "the top {d}", "the upper {d}"),
    "bottom": ("the {d} at the bottom", "the bottom {d}", "the lower {d}"),
}
# Shortest wording first: it is the fallback when a phrase would exceed MAX_WORDS.
_RELATION_WORDS = {
    "left": ("left of", "to the left of"),
    "right": ("right of", "to the right of"),
    "above": ("above",),
    "below": ("below", "under"),
    "near": ("near", "next to", "closest to", "beside"),
}


class _Scene:
    """The objects of one image with their description groups, computed once per scene."""

    def __init__(self, objects: list[ShapeObject], size: int) -> None:
        self.objects, self.size = objects, size
        self.margin = 0.09 * size  # the pixel margin that makes a position or relation clear
        # groups[d][i]: indices of the objects sharing object i's values on descriptor d.
        self.groups: dict[tuple[str, ...], list[list[int]]] = {}
        for d in _DESCRIPTORS:
            keys = [tuple(o.attr(a) for a in d) for o in objects]
            self.groups[d] = [[j for j, k in enumerate(keys) if k == key] for key in keys]
        # unique[i]: the descriptors that single out object i; minimal[i]: the shortest ones.
        self.unique = [
            [d for d in _DESCRIPTORS if self.groups[d][i] == [i]] for i in range(len(objects))
        ]
        self.minimal = [_minimal(u) for u in self.unique]

    def has_distractor(self, i: int) -> bool:
        """Whether another object shares object i's colour or shape."""
        t = self.objects[i]
        return any(
            j != i and (o.colour == t.colour or o.shape == t.shape)
            for j, o in enumerate(self.objects)
        )

    def most_central(self, t: int, query: dict) -> bool:
        """Whether t is, of the objects matching the query's description, the nearest the centre."""
        group = self.groups[tuple(query["desc"])][t]
        half = self.size / 2
        off = {i: math.hypot(self.objects[i].cx - half, self.objects[i].cy - half) for i in group}
        return min(group, key=off.__getitem__) == t

    def candidates(self, t: int, kind: str) -> list[dict]:
        """All unambiguous phrase structures of one kind for target t."""
        if kind == "attr":
            return self._attr(t)
        if kind == "absolute":
            return self._absolute(t)
        return self._relation(t, kind)

    def _attr(self, t: int) -> list[dict]:
        """Unique descriptions of t; over-specified ones kept but rarer (see _pick)."""
        return [
            {"kind": "attr", "desc": list(d), "weight": 3.0 if d in self.minimal[t] else 1.0}
            for d in self.unique[t]
        ]

    def _absolute(self, t: int) -> list[dict]:
        """Shared descriptions where t is the clear extreme in a direction among the matches."""
        objs, out = self.objects, []
        for d in _DESCRIPTORS:
            group = self.groups[d][t]
            if len(group) < 2:
                continue
            keys = {
                "left": {i: objs[i].cx for i in group},
                "right": {i: -objs[i].cx for i in group},
                "top": {i: objs[i].cy for i in group},
                "bottom": {i: -objs[i].cy for i in group},
            }
            for position, values in keys.items():
                if _extreme(values, t, self.margin):
                    out.append({"kind": "absolute", "desc": list(d), "position": position})
        return out

    def _relation(self, t: int, kind: str) -> list[dict]:
        """Shared descriptions of t plus a uniquely described reference that settles which."""
        objs, margin, out = self.objects, self.margin, []
        for d in _DESCRIPTORS:
            group = self.groups[d][t]
            if len(group) < 2:
                continue
            for r, ref in enumerate(objs):
                if r in group or not self.minimal[r]:
                    continue
                if kind == "direction":
                    relations = []
                    for relation in ("left", "right", "above", "below"):
                        # Target clearly on that side (and mostly along that axis, so "below"
                        # never names an object far off to the side); every other match level
                        # with the reference or beyond it.
                        along, across = _side_offset(objs[t], ref, relation)
                        if (
                            along >= margin
                            and across <= 1.2 * along
                            and all(
                                _side_offset(objs[i], ref, relation)[0] <= 0
                                for i in group
                                if i != t
                            )
                        ):
                            relations.append(relation)
                else:
                    dist = {i: math.hypot(objs[i].cx - ref.cx, objs[i].cy - ref.cy) for i in group}
                    gaps = {i: _gap(objs[i], ref) for i in group}
                    # Clearly the closest, centre to centre (an absolute and a relative margin)
                    # and edge to edge, so a large object's size cannot flip the answer.
                    clear = all(
                        dist[t] + margin <= dist[i]
                        and dist[t] * 1.4 <= dist[i]
                        and gaps[t] + 2 <= gaps[i]
                        for i in group
                        if i != t
                    )
                    relations = ["near"] if clear else []
                out.extend(
                    {
                        "kind": kind,
                        "desc": list(d),
                        "relation": relation,
                        "reference": r,
                        "ref_desc": list(rd),
                    }
                    for relation in relations
                    for rd in self.minimal[r]
                )
        return out


def _minimal(descs: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
    """The descriptors none of whose strict subsets are also in `descs`."""
    return [d for d in descs if not any(set(e) < set(d) for e in descs)]


def _extreme(values: dict[int, float], target: int, margin: float) -> bool:
    """Whether `target` has the smallest value by at least `margin` over every other key."""
    return all(values[target] + margin <= v for k, v in values.items() if k != target)


def _gap(a: ShapeObject, b: ShapeObject) -> float:
    """The shortest distance between the boxes of a and b (0 when they touch)."""
    dx = max(0, a.box[0] - b.box[2], b.box[0] - a.box[2])
    dy = max(0, a.box[1] - b.box[3], b.box[1] - a.box[3])
    return math.hypot(dx, dy)


def _side_offset(obj: ShapeObject, ref: ShapeObject, relation: str) -> tuple[float, float]:
    """How far `obj` lies on the `relation` side of `ref` and across it, centre to centre."""
    dx, dy = obj.cx - ref.cx, obj.cy - ref.cy
    if relation == "left":
        return -dx, abs(dy)
    if relation == "right":
        return dx, abs(dy)
    if relation == "above":
        return -dy, abs(dx)
    return dy, abs(dx)  # below


def _kind_order(rng: np.random.Generator, family: str) -> list[str]:
    """The phrase kinds to try, preferred first, for a split's family."""
    direction_first = 0.6
    if family == "relational-train":
        family = "relation" if rng.random() < TRAIN_RELATION_SHARE else "attribute"
        direction_first = 1 - TRAIN_NEAREST_FIRST
    elif family == "mixed":
        family = "attribute" if rng.random() < 0.5 else "relation"
    if family == "attribute":
        return ["attr", "absolute"] if rng.random() < 0.5 else ["absolute", "attr"]
    return ["direction", "nearest"] if rng.random() < direction_first else ["nearest", "direction"]


def make_queries(
    rng: np.random.Generator, objects: list[ShapeObject], size: int, family: str, n_rows: int
) -> list[dict] | None:
    """`n_rows` phrase structures with different targets, or None if the scene cannot."""
    scene = _Scene(objects, size)
    eligible = [i for i in range(len(objects)) if scene.has_distractor(i)]
    used: set[int] = set()
    queries = []
    for _ in range(n_rows):
        chosen = None
        order = [int(i) for i in rng.permutation(eligible) if int(i) not in used]
        for kind in _kind_order(rng, family):
            for t in order:
                cands = scene.candidates(t, kind)
                if family == "relational-train" and kind == "nearest":
                    cands = [
                        c
                        for c in cands
                        if not (scene.most_central(t, c) and rng.random() < TRAIN_DECENTRE)
                    ]
                if cands:
                    chosen = _pick(rng, cands)
                    chosen["target"] = t
                    break
            if chosen is not None:
                break
        if chosen is None:
            return None
        used.add(chosen["target"])
        chosen["text"] = _word(rng, objects, chosen)
        queries.append(chosen)
    return queries


def _pick(rng: np.random.Generator, cands: list[dict]) -> dict:
    """One candidate, by its weight (default 1)."""
    weights = np.array([c.pop("weight", 1.0) for c in cands], dtype=np.float64)
    return cands[int(rng.choice(len(cands), p=weights / weights.sum()))]


def _describe(rng: np.random.Generator, obj: ShapeObject, desc: list[str]) -> list[str]:
    """Words for `obj` under descriptor `desc`, in the order size, colour, shape."""
    words = []
    if "size" in desc:
        options = _SIZE_WORDS[obj.size]
        words.append(options[int(rng.integers(len(options)))])
    if "colour" in desc:
        words.append(obj.colour)
    words.append(obj.shape)
    return words


def _word(rng: np.random.Generator, objects: list[ShapeObject], q: dict) -> str:
    """The phrase text of a query structure, at most MAX_WORDS words."""
    d = " ".join(_describe(rng, objects[q["target"]], q["desc"]))
    if q["kind"] == "attr":
        return f"the {d}"
    if q["kind"] == "absolute":
        options = _ABSOLUTE_TEMPLATES[q["position"]]
        return options[int(rng.integers(len(options)))].format(d=d)
    r = " ".join(_describe(rng, objects[q["reference"]], q["ref_desc"]))
    options = _RELATION_WORDS[q["relation"]]
    text = f"the {d} {options[int(rng.integers(len(options)))]} the {r}"
    if len(text.split()) > MAX_WORDS:
        text = f"the {d} {options[0]} the {r}"
    return text
