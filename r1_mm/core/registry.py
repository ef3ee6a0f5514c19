"""One registry class for every table of named things in r1_mm, and one "did you mean" for every message.

Rewards, rollout engines, trainers, trackers, advantage estimators and loss aggregators are all found
by a name from a recipe or a command line; before this module each had its own dict, its own
registration decorator and its own copy of the suggestion code, and they had drifted apart (some
silently replaced a name given twice, some listed the known names, some did not). A
:class:`Registry` gives them one behaviour:

- ``register(name)`` as a decorator, or ``register(name, obj)`` as a plain call; a name given twice
  is refused (:class:`DuplicateNameError`) unless the caller opts in with ``replace=True``;
- lazy entries, ``"package.module:attribute"`` imported on the first ``get`` of the name, so that a
  heavy dependency (vLLM) is imported only by the runs that ask for it. The entry names the object,
  so its module need not import the registry (the table naming a module that imports the table back
  would be an import cycle);
- ``get(name)`` raises :class:`UnknownNameError` saying what is unknown, with the closest name
  (:func:`suggest`) or the list of known ones.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

T = TypeVar("T")

SUGGEST_CUTOFF = 0.5  # difflib's similarity ratio a name needs to be offered as "did you mean"


class RegistryError(ValueError):
    """A registry refused a name (ValueError: an unknown engine was a ValueError before, callers catch it)."""


class DuplicateNameError(RegistryError):
    """A name registered a second time without ``replace=True``."""


class UnknownNameError(RegistryError, LookupError):
    """``get`` of a name nobody registered; the message carries the suggestion."""


def suggest(name: str, choices: Iterable[str], *, listing: str | None = "known") -> str:
    """The tail of an "unknown name" message: ``"; did you mean 'x'?"`` naming the closest choice, or,
    when none is close, ``"; <listing>: a, b, c"`` (the choices, sorted), or ``""`` if ``listing`` is None
    (the caller explains the choices itself)."""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(name), choices, n=1, cutoff=SUGGEST_CUTOFF)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; {listing}: {', '.join(sorted(choices))}" if listing is not None else ""


class Registry(Generic[T]):
    """Named objects of one ``kind`` (used in messages: ``unknown <kind> 'x'``).

    ``lazy`` maps names to ``"module:attribute"`` paths imported on first ``get``. Each entry carries
    an ``origin``, a line saying where it comes from (``r1-mm rewards list`` shows it).
    """

    def __init__(self, kind: str, *, lazy: Mapping[str, str] | None = None):
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._origins: dict[str, str] = {}
        self._lazy: dict[str, str] = {}
        for name, target in (lazy or {}).items():
            self.add_lazy(name, target)

    @overload
    def register(self, name: str, obj: None = None, *, replace: bool = False,
                 origin: str | None = None) -> Callable[[T], T]: ...

    @overload
    def register(self, name: str, obj: T, *, replace: bool = False, origin: str | None = None) -> T: ...

    def register(self, name: str, obj: Any = None, *, replace: bool = False, origin: str | None = None) -> Any:
        """``@registry.register("name")`` or ``registry.register("name", obj)``; returns ``obj``.

        A lazy name counts as registered. ``origin`` defaults to the object's ``module:qualname``.
        """

        def add(value: T) -> T:
            if name in self and not replace:
                raise DuplicateNameError(f"{self.kind} '{name}' is already registered ({self.origin(name) or '?'}); "
                                         "register it under another name")
            self._entries[name] = value
            self._origins[name] = origin if origin is not None else _where(value)
            return value

        return add if obj is None else add(obj)

    def add_lazy(self, name: str, target: str) -> None:
        """Make ``name`` known now and loaded later: ``get(name)`` imports ``target``'s module
        (``"package.module:attribute"``) and registers the attribute."""
        if ":" not in target:
            raise RegistryError(f"{self.kind} '{name}': a lazy entry is 'package.module:attribute', got {target!r}")
        if name in self:
            raise DuplicateNameError(f"{self.kind} '{name}' is already registered ({self.origin(name) or target})")
        self._lazy[name] = target

    def get(self, name: str) -> T:
        """The object registered as ``name`` (importing its module if the entry is lazy)."""
        if name not in self._entries and name in self._lazy:
            target = self._lazy[name]
            module, _, attribute = target.partition(":")
            value = getattr(importlib.import_module(module), attribute, _MISSING)
            if value is _MISSING:
                raise RegistryError(f"{self.kind} '{name}': module {module} has no '{attribute}'")
            self._entries[name], self._origins[name] = value, target
        if name not in self._entries:
            raise UnknownNameError(f"unknown {self.kind} '{name}'" + suggest(name, self.names()))
        return self._entries[name]

    def remove(self, name: str) -> None:
        """Forget ``name`` (tests that register a throw-away entry clean up with this)."""
        self._entries.pop(name, None)
        self._origins.pop(name, None)
        self._lazy.pop(name, None)

    def origin(self, name: str) -> str:
        """Where ``name``'s object comes from; ``""`` for a name not (yet) registered."""
        return self._origins.get(name, "")

    def names(self) -> list[str]:
        """Every known name, loaded or lazy, sorted."""
        return sorted(set(self._entries) | set(self._lazy))

    def items(self) -> list[tuple[str, T]]:
        """The registered (loaded) entries; lazy ones not imported yet are left out."""
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


_MISSING = object()


def _where(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or "?"
    return f"{module}:{getattr(obj, '__qualname__', type(obj).__qualname__)}"
