"""A tiny name -> object registry shared by every pluggable variant.

Partition strategies, router modes, pseudo-label rules, combine rules and FFN
adapters each live in one `Registry`. Adding a variant is one decorated function;
shared loops look variants up by name and never branch on the name themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to variants; rejects duplicates and explains unknown names."""

    def __init__(self, kind: str):
        self.kind = kind  # e.g. "partition", used in error messages
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        return add

    def get(self, name: str, field: str | None = None) -> T:
        if name not in self._items:
            raise ValueError(
                f"{field or self.kind}={name!r} is not a known {self.kind}; allowed: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        """Sorted, for messages."""
        return sorted(self._items)

    def in_order(self) -> list[str]:
        """In registration order: where the first match wins (FFN adapters), the order is the
        order of registration, never the alphabet."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.in_order())
