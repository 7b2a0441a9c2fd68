"""The one error every layer shares: input adamerge refuses, with a message that names it.

:class:`~adamerge.merging.task_vectors.MergeError` (state dicts that cannot be merged) and
:class:`~adamerge.models.checkpoints.CheckpointError` (checkpoint files that cannot be used) both
derive from :class:`AdaMergeError`, and neither from the other, so the layers stay apart; catch
``AdaMergeError`` for both (the command line reports it in one line).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence

__all__ = ["AdaMergeError", "guarded"]


class AdaMergeError(ValueError):
    """Bad input refused with a message naming the file, task or key at fault."""


def guarded(run: Callable[[list[str]], object], args: Sequence[str],
            errors: tuple[type[BaseException], ...] = ()) -> None:
    """``run(args)`` with :class:`AdaMergeError`, :class:`FileNotFoundError` and ``errors`` (a command's
    own user errors) ending in one line on stderr and exit status 2 (set ``ADAMERGE_TRACEBACK=1`` for
    the traceback). Light on purpose: ``adamerge merge`` imports neither Lightning nor transformers."""
    try:
        run(list(args))
    except (AdaMergeError, FileNotFoundError, *errors) as e:
        if os.environ.get("ADAMERGE_TRACEBACK"):
            raise
        print(f"adamerge: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
