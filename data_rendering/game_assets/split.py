"""Train / test split by model, never by clip.

Clips are grouped by their model, and models that share a mesh (the same vertex count and triangles: one unit
copied into several factions, a tree into several tilesets) are joined into one group. A group goes to the test side
when a seeded hash of its smallest member key falls under the test fraction: the side of a model does not depend on
which other models are present, so list files grown by later runs stay consistent.
"""
from __future__ import annotations

import hashlib


def groups(members: dict[str, tuple[str, str]]) -> dict[str, str]:
    """sample -> group key, for samples given as sample -> (model key, mesh fingerprint): union of models that share
    a fingerprint (union-find), keyed by the smallest model key of the group."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    for model, fingerprint in members.values():
        union("model:" + model, "mesh:" + fingerprint)
    root_model: dict[str, str] = {}
    for model, _ in members.values():
        root = find("model:" + model)
        root_model[root] = min(root_model.get(root, model), model)
    return {sample: root_model[find("model:" + model)] for sample, (model, _) in members.items()}


def is_test(group: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}:{group}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64 < fraction


def split(members: dict[str, tuple[str, str]], seed: int, fraction: float) -> tuple[list[str], list[str]]:
    """(train, test) sample names, sorted."""
    grouped = groups(members)
    test = sorted(s for s, g in grouped.items() if is_test(g, seed, fraction))
    taken = set(test)
    return sorted(s for s in grouped if s not in taken), test
