"""The one error every layer shares: input adamerge refuses, with a message that names it.

:class:`~adamerge.merging.task_vectors.MergeError` (state dicts that cannot be merged) and
:class:`~adamerge.models.checkpoints.CheckpointError` (checkpoint files that cannot be used) both
derive from :class:`AdaMergeError`, and neither from the other, so the layers stay apart; catch
``AdaMergeError`` for both (the command line reports it in one line).
"""

from __future__ import annotations

__all__ = ["AdaMergeError"]


class AdaMergeError(ValueError):
    """Bad input refused with a message naming the file, task or key at fault."""
