"""Source labels -> weakseg classes: ``identity``, ``voc`` (WordNet) or a user CSV.

``voc`` follows the paper: every ImageNet synset below a PASCAL VOC class's root synset in
WordNet maps to that class (all dog breeds -> dog, tabby -> cat, airliner -> aeroplane,
mountain bike -> bicycle, ...), and a seeded sample of synsets unrelated to all 20 roots
becomes ``background``. Synsets related to a root only as an ancestor (``animal``) or
left out of the background sample are dropped, and counted.
"""
from __future__ import annotations

import csv
import hashlib
import io
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

from ...models.losses import BACKGROUND
from ..storage import redact_url

__all__ = [
    "BACKGROUND",
    "VOC_CLASSES",
    "VOC_ROOTS",
    "LabelMap",
    "UnmappedLabelsError",
    "build_label_map",
    "ilsvrc_synsets",
    "wordnet_children",
    "wordnet_words",
]


# Root synsets of the 20 PASCAL VOC classes in WordNet 3.0 (ImageNet's ids). Several roots
# where VOC's class is wider than one WordNet node (mopeds are motorbikes; locomotives and
# railcars are trains; ships are boats).
VOC_ROOTS: dict[str, tuple[str, ...]] = {
    "aeroplane": ("n02691156",),  # airplane, aeroplane, plane
    "bicycle": ("n02834778",),  # bicycle, bike, wheel, cycle
    "bird": ("n01503061",),  # bird
    "boat": ("n02858304", "n04530566"),  # boat; vessel, watercraft
    "bottle": ("n02876657",),  # bottle
    "bus": ("n02924116",),  # bus, autobus, coach, ...
    "car": ("n02958343",),  # car, auto, automobile, machine, motorcar
    "cat": ("n02121808",),  # domestic cat, house cat
    "chair": ("n03001627",),  # chair
    "cow": ("n02402425",),  # cattle, cows, kine, oxen
    "diningtable": ("n03201208",),  # dining table, board
    "dog": ("n02084071",),  # dog, domestic dog
    "horse": ("n02374451",),  # horse, Equus caballus
    "motorbike": ("n03790512", "n03785016", "n03791053"),  # motorcycle; moped; motor scooter
    "person": ("n00007846",),  # person, individual, someone, ...
    "pottedplant": ("n03991062",),  # pot, flowerpot
    "sheep": ("n02411705",),  # sheep
    "sofa": ("n04256520",),  # sofa, couch, lounge
    "train": ("n04468005", "n03684823", "n02959942"),  # train; locomotive; railcar
    "tvmonitor": ("n04404412", "n03782006", "n04152593"),  # television; monitor; CRT screen
}
VOC_CLASSES: tuple[str, ...] = (BACKGROUND, *sorted(VOC_ROOTS))


class UnmappedLabelsError(ValueError):
    """Source labels that a label map does not cover, all listed at once."""

    def __init__(self, labels: set[str]) -> None:
        shown = sorted(labels)
        more = f" and {len(shown) - 20} more" if len(shown) > 20 else ""
        super().__init__(f"{len(shown)} source labels are not in the label map: {', '.join(shown[:20])}{more}")
        self.labels = shown


def _data(name: str) -> str:
    return resources.files("weakseg.data.imagenet").joinpath(name).read_text(encoding="utf-8")


@cache
def wordnet_words() -> dict[str, str]:
    out = {}
    for line in _data("words.txt").splitlines():
        wnid, _, words = line.partition("\t")
        out[wnid] = words
    return out


@cache
def wordnet_children() -> dict[str, tuple[str, ...]]:
    children: dict[str, list[str]] = defaultdict(list)
    for line in _data("wordnet.is_a.txt").splitlines():
        parent, child = line.split()
        children[parent].append(child)
    return {k: tuple(v) for k, v in children.items()}


@cache
def ilsvrc_synsets() -> tuple[str, ...]:
    """The 1000 ILSVRC-2012 synsets in class-index order."""
    return tuple(line.split()[0] for line in _data("LOC_synset_mapping.txt").splitlines() if line.strip())


def _descendants(root: str) -> set[str]:
    children = wordnet_children()
    seen, stack = {root}, [root]
    while stack:
        for child in children.get(stack.pop(), ()):
            if child not in seen:
                seen.add(child)
                stack.append(child)
    return seen


@cache
def _ancestors() -> dict[str, set[str]]:
    parents: dict[str, set[str]] = defaultdict(set)
    for parent, kids in wordnet_children().items():
        for kid in kids:
            parents[kid].add(parent)
    return parents


def _is_ancestor_of_any(wnid: str, roots: set[str]) -> bool:
    parents, stack, seen = _ancestors(), list(roots), set()
    while stack:
        node = stack.pop()
        for parent in parents.get(node, ()):
            if parent == wnid:
                return True
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return False


@cache
def voc_synset_classes() -> dict[str, str]:
    """Every synset below a VOC root -> its VOC class (first root wins on overlaps)."""
    out: dict[str, str] = {}
    for name in sorted(VOC_ROOTS):
        for root in VOC_ROOTS[name]:
            for wnid in _descendants(root):
                out.setdefault(wnid, name)
    return out


def _keep_as_background(wnid: str, fraction: float, seed: int) -> bool:
    digest = hashlib.sha256(f"{seed}:{wnid}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


@dataclass
class LabelMap:
    """Maps source labels to class names; ``None`` means: drop the sample (counted)."""

    kind: str
    classes: tuple[str, ...]
    mapping: dict[str, str | None] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def map(self, source_labels: list[str]) -> list[str] | None:
        """Class names for a sample's source labels (deduplicated, in class order)."""
        missing = {s for s in source_labels if s not in self.mapping}
        if missing:
            raise UnmappedLabelsError(missing)
        names = {self.mapping[s] for s in source_labels} - {None}
        if not names:
            return None
        return sorted(names, key=self.classes.index)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "classes": list(self.classes), **self.details}


def _order(names: set[str]) -> tuple[str, ...]:
    rest = sorted(n for n in names if n != BACKGROUND)
    return (BACKGROUND, *rest) if BACKGROUND in names else tuple(rest)


def _identity(source_labels: set[str]) -> LabelMap:
    return LabelMap("identity", _order(source_labels), {s: s for s in source_labels})


def _voc(source_labels: set[str], background_fraction: float, seed: int) -> LabelMap:
    below = voc_synset_classes()
    roots = {r for rs in VOC_ROOTS.values() for r in rs}
    mapping: dict[str, str | None] = {}
    not_wnids = sorted(s for s in source_labels if s not in wordnet_words())
    if not_wnids:
        raise ValueError(f"label map 'voc' needs WordNet synset ids as source labels; got {not_wnids[:10]}")
    for wnid in source_labels:
        if wnid in below:
            mapping[wnid] = below[wnid]
        elif not _is_ancestor_of_any(wnid, roots) and _keep_as_background(wnid, background_fraction, seed):
            mapping[wnid] = BACKGROUND
        else:
            mapping[wnid] = None
    ilsvrc_counts: dict[str, int] = defaultdict(int)
    for wnid in ilsvrc_synsets():
        ilsvrc_counts[below.get(wnid, "(unrelated)")] += 1
    details = {
        "roots": {k: list(v) for k, v in VOC_ROOTS.items()},
        "ilsvrc_synsets_per_class": dict(sorted(ilsvrc_counts.items())),
        "background_fraction": background_fraction,
        "background_seed": seed,
        "source_synsets_per_class": _count(mapping),
    }
    return LabelMap("voc", VOC_CLASSES, mapping, details)


def _count(mapping: dict[str, str | None]) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for name in mapping.values():
        counts[name or "(dropped)"] += 1
    return dict(sorted(counts.items()))


def _from_csv(text: str, source_labels: set[str], name: str) -> LabelMap:
    rows = list(csv.DictReader(io.StringIO(text)))
    if not rows or not {"source_label", "label"} <= set(rows[0]):
        raise ValueError(f"label map {name} must be a CSV with columns source_label,label")
    mapping: dict[str, str | None] = {r["source_label"].strip(): (r["label"].strip() or None) for r in rows}
    missing = source_labels - set(mapping)
    if missing:
        raise UnmappedLabelsError(missing)
    used = {mapping[s] for s in source_labels} - {None}
    return LabelMap("csv", _order(used), mapping, {"file": name})


def build_label_map(
    spec: str,
    source_labels: set[str],
    background_fraction: float = 0.25,
    seed: int = 0,
    read_text: Any = None,
) -> LabelMap:
    """``identity``, ``voc`` or the URL of a ``source_label,label`` CSV."""
    if not source_labels:
        raise ValueError("no source labels to map")
    if spec == "identity":
        return _identity(source_labels)
    if spec == "voc":
        return _voc(source_labels, background_fraction, seed)
    if read_text is None:
        raise ValueError(f"unknown label map {spec!r}: use identity, voc or the URL of a CSV")
    return _from_csv(read_text(spec), source_labels, redact_url(spec))  # recorded: without credentials
