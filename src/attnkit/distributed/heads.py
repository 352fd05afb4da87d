"""Which heads each rank of a Ulysses group computes, in how many rounds, and their patterns.

Ulysses turns sequence shards into head shards: each of the ``U`` ranks of a group computes a
contiguous range of query heads over the whole (group's) sequence, with the key/value heads those
query heads use (query head ``h`` uses KV head ``h // (Hq // Hkv)``). The split:

- ``Hkv >= U``: the KV heads are cut into ``U`` contiguous ranges as even as possible (sizes
  differ by at most one) and each rank takes the query heads of its KV heads: every KV head goes
  to one rank, and the query heads per rank differ by at most one group. ``Hkv % U != 0`` is
  thus an uneven split, not an error.
- ``Hkv < U`` (GQA or MQA with more ranks than KV heads): the query heads are cut into ``U``
  ranges as even as possible and each rank takes the KV heads its query heads use; a KV head
  then goes to several ranks (replicated, which is exact: its gradients are summed on the way
  back).
- ``Hq < U``: some rank would get no head; a ValueError says to use fewer Ulysses ranks (the
  hybrid scheme runs a ring across the rest).

Large problems go in rounds of a few KV heads at a time (:func:`plan_rounds`), so the gathered
tensors of one round stay bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..patterns import Pattern, PerHead, head_pattern

Range = tuple[int, int]


@dataclass(frozen=True)
class HeadSplit:
    """``q[r]``: the query heads ``[start, stop)`` rank ``r`` computes; ``kv[r]``: the KV heads
    they use. A range may be empty (``start == stop``) in a round a rank sits out."""

    q: tuple[Range, ...]
    kv: tuple[Range, ...]


def _even(n: int, parts: int) -> list[Range]:
    sizes = [n // parts + (r < n % parts) for r in range(parts)]
    starts = [sum(sizes[:r]) for r in range(parts)]
    return [(start, start + size) for start, size in zip(starts, sizes)]


def split_heads(n_q_heads: int, n_kv_heads: int, degree: int) -> HeadSplit:
    """The split of ``n_q_heads`` query and ``n_kv_heads`` KV heads over ``degree`` ranks (see the
    module docstring). ValueError when ``degree > n_q_heads``."""
    if degree > n_q_heads:
        raise ValueError(
            f"Ulysses degree {degree} exceeds the {n_q_heads} query heads: every rank needs at least one "
            f"head; use at most {n_q_heads} Ulysses ranks (hybrid_attention runs a ring across the rest)"
        )
    groups = n_q_heads // n_kv_heads
    if n_kv_heads >= degree:
        kv = _even(n_kv_heads, degree)
        q = [(start * groups, stop * groups) for start, stop in kv]
    else:
        q = _even(n_q_heads, degree)
        kv = [(start // groups, (stop - 1) // groups + 1) for start, stop in q]
    return HeadSplit(tuple(q), tuple(kv))


def plan_rounds(split: HeadSplit, groups: int, kv_per_round: int) -> list[HeadSplit]:
    """``split`` cut into rounds of at most ``kv_per_round`` KV heads per rank: round ``i`` holds
    each rank's ``i``-th run of KV heads and the query heads (of its range) that use them. Every
    query head is in exactly one round, and every KV head of a rank in exactly one round.

    A round's query heads must map onto its KV heads as GQA does (``h // groups``): a rank whose
    range cuts a group and spans several KV heads (``Hkv < U`` with an uneven split, say query
    heads 3-5 of groups of 4) can only go one KV head per round, so then every rank does."""
    cuts_groups = any(
        (start % groups or stop % groups) and kv_stop - kv_start > 1
        for (start, stop), (kv_start, kv_stop) in zip(split.q, split.kv)
    )
    kv_per_round = 1 if cuts_groups else kv_per_round
    n_rounds = max(-(-(stop - start) // kv_per_round) for start, stop in split.kv)
    rounds = []
    for i in range(n_rounds):
        q, kv = [], []
        for (q_start, q_stop), (kv_start, kv_stop) in zip(split.q, split.kv):
            first, last = min(kv_start + i * kv_per_round, kv_stop), min(kv_start + (i + 1) * kv_per_round, kv_stop)
            if first == last:
                q.append((q_start, q_start))
                kv.append((kv_start, kv_start))
                continue
            q.append((max(q_start, first * groups), min(q_stop, last * groups)))
            kv.append((first, last))
        rounds.append(HeadSplit(tuple(q), tuple(kv)))
    return rounds


def heads_of(pattern: Pattern, start: int, stop: int) -> Pattern:
    """The pattern of query heads ``[start, stop)`` of a call that uses ``pattern`` (itself, unless
    it is per-head)."""
    if pattern.n_heads is None or stop <= start:
        return pattern
    return PerHead(tuple(head_pattern(pattern, h) for h in range(start, stop)))


__all__ = ["HeadSplit", "heads_of", "plan_rounds", "split_heads"]
