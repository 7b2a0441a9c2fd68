"""Short class names (``--model AdaMerging``, ``class_path: MiniBenchmarkPool``): a name no loaded class
has is refused before parsing, with the close matches.

jsonargparse resolves a dot-less ``class_path`` among the imported subclasses of the expected type and,
for a name it does not know, reports a union mismatch that never says which names exist. Here every
dot-less class name given to ``--model`` / ``--data`` / ``--….class_path`` or written as a ``class_path``
in a ``--config`` file is looked up among the classes loaded (the CLI imports every system, pool,
source and component first); an unknown one fails with the names it is closest to.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import yaml

from adamerge.errors import AdaMergeError

__all__ = ["UnknownClassError", "check_short_names"]

_SELECTORS = ("--model", "--data")
_NAME = re.compile(r"^[A-Za-z_]\w*$")
_SUGGEST_FROM = ("adamerge", "lightning", "torch.optim")  # where close matches are looked for


class UnknownClassError(AdaMergeError):
    """A short class name that no loaded class has."""


def _loaded_classes() -> Iterator[type]:
    seen: set[type] = set()
    stack = [object]
    while stack:
        cls = stack.pop()
        for sub in type.__subclasses__(cls) if cls is not type else []:
            if sub not in seen:
                seen.add(sub)
                stack.append(sub)
                yield sub


def _class_paths(node) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "class_path" and isinstance(value, str):
                yield value
            else:
                yield from _class_paths(value)
    elif isinstance(node, list):
        for item in node:
            yield from _class_paths(item)


def _given_names(args: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(where, name) of every class name in ``args`` and the ``--config`` files they name."""
    args = list(args)
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if not eq and i + 1 < len(args):
            value = args[i + 1]
        if key in _SELECTORS or key.endswith(".class_path"):
            yield key, value
        elif key == "--config" and Path(value).is_file():
            try:
                data = yaml.safe_load(Path(value).read_text())
            except yaml.YAMLError:
                continue  # the parser reports a broken file in its own words
            for name in _class_paths(data):
                yield value, name


def check_short_names(args: Sequence[str]) -> None:
    """Refuse a dot-less class name in ``args`` (or their config files) that no loaded class has."""
    wanted = [(where, name) for where, name in _given_names(args) if _NAME.match(name)]
    if not wanted:
        return
    classes = list(_loaded_classes())
    known = {c.__name__ for c in classes}
    for where, name in wanted:
        if name in known:
            continue
        candidates = sorted({c.__name__ for c in classes if str(getattr(c, "__module__", None) or "").startswith(_SUGGEST_FROM)})
        close = difflib.get_close_matches(name, candidates, n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else " (`adamerge methods` lists the methods)"
        raise UnknownClassError(f"{where}: no class named {name!r}{hint}")
