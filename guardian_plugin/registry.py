"""A name -> factory registry, one per family (transformation models, sources, attacks, ...)."""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional


class Registry:
    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Callable] = {}

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def deco(obj: Callable) -> Callable:
            if name in self._items:
                raise KeyError(f"{self.kind} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> Callable:
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise KeyError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))

    def names(self) -> list:
        return sorted(self._items)

    # A registered factory may carry ``supports(size, channels, ...)``: None when it works at that image
    # format, else a sentence saying why not. The constraint lives next to the component it describes.
    def unsupported(self, name: str, size: int, channels: int, **kw) -> Optional[str]:
        """Why ``name`` cannot work at ``channels`` x ``size`` px (None: it can, or it declares no limit)."""
        hook = getattr(self.get(name), "supports", None)
        return hook(size, channels, **kw) if hook is not None else None

    def supporting(self, size: int, channels: int) -> List[str]:
        """The names that work at ``channels`` x ``size`` px with their default settings."""
        return [n for n in self if self.unsupported(n, size, channels) is None]
