"""Tag tuples joined once: the one cache keyed by the identity of tag tuples.

A step's tags are a few tuples (the loss and learning rate, the gradient statistics, the
activations, the update ratios), the same tuple objects step after step. Hashing ~700 strings a
step costs more than the step's arithmetic, so joins are cached by the tuples' identities.

Invariant: the cache keeps the tuples it was keyed by alive, so an id is never reused for another
tuple while its entry exists; a caller that makes new tuples every step only costs a rebuild
(the cache is cleared past `limit` entries, it never grows without bound).

    >>> joined = JoinedNames()
    >>> a, b = ("train/loss", "lr"), ("grad/global_norm",)
    >>> joined.join([a, b])
    ('train/loss', 'lr', 'grad/global_norm')
    >>> joined.join([a, b]) is joined.join([a, b])
    True
"""

from collections.abc import Callable, Sequence


class JoinedNames:
    """`join(groups)`: the concatenation of `groups` (tuples of tags), one tuple object per
    combination of group objects; `cached(groups, make)`: anything made from the groups, cached
    the same way."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self._cache: dict[tuple[int, ...], tuple[object, tuple]] = {}

    def cached(self, groups: Sequence[tuple[str, ...]], make: Callable[[tuple], object]) -> object:
        key = tuple(map(id, groups))
        entry = self._cache.get(key)
        if entry is None:
            if len(self._cache) > self.limit:
                self._cache.clear()
            kept = tuple(groups)  # keeps the keys' objects alive (the invariant above)
            entry = self._cache[key] = make(kept), kept
        return entry[0]

    def join(self, groups: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
        # `cached`'s lookup inline: called a few times every step, a Python frame less each.
        entry = self._cache.get(tuple(map(id, groups)))
        return entry[0] if entry is not None else self.cached(groups, _concatenate)

    def clear(self) -> None:
        self._cache.clear()


def _concatenate(groups: tuple) -> tuple[str, ...]:
    return tuple(name for group in groups for name in group)
