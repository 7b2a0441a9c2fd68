"""The ``adamerge`` console script: ``adamerge reproduce ...`` (:mod:`adamerge.reproduce`, the papers'
tables from Hub ids), ``adamerge merge ...`` (:mod:`adamerge.merge_cli`, one static merge of HF or
open_clip models written to disk) or a LightningCLI run, ``adamerge {fit,validate,test,methods} ...``
(:mod:`adamerge.cli`); either way a configuration or file error ends in one line and exit status 2."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from adamerge.errors import guarded

__all__ = ["entry"]


def entry(args: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["merge"]:  # imports neither Lightning nor transformers (a lighter, faster command)
        from adamerge.merge_cli import main as merge

        guarded(merge, argv[1:])
        return
    from adamerge.cli import main as cli_main
    from adamerge.cli import user_errors

    if argv[:1] == ["reproduce"]:
        from adamerge.reproduce import main as reproduce

        guarded(reproduce, argv[1:], user_errors())
    else:
        guarded(cli_main, argv, user_errors())
