"""Command line: ``python train.py {fit,validate,test} --config configs/....yaml`` (or ``adamerge ...``).

A :class:`lightning.pytorch.cli.LightningCLI` over the test-time systems (``model: class_path:
adamerge.systems....``) and the test-time DataModule. The task list is written once, in the data
section, and linked into the system (``data.tasks → model.init_args.tasks``), so a pool, its heads
and its data can't disagree about which tasks are merged.
"""

from __future__ import annotations

from collections.abc import Sequence

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

__all__ = ["AdaMergeCLI", "main"]


class AdaMergeCLI(LightningCLI):
    """LightningCLI with adamerge's links and defaults (seed 0, config saved next to the run)."""

    def __init__(self, *args, **kwargs) -> None:
        from adamerge.data.datamodule import TestTimeDataModule
        from adamerge.systems.base import TestTimeSystem

        kwargs.setdefault("model_class", TestTimeSystem)
        kwargs.setdefault("datamodule_class", TestTimeDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # The task list comes from the data (after it is instantiated) and is never written twice.
        parser.link_arguments("data.tasks", "model.init_args.tasks", apply_on="instantiate")


def main(args: Sequence[str] | None = None, run: bool = True) -> AdaMergeCLI:
    """Entry point of ``train.py`` and the ``adamerge`` console script."""
    return AdaMergeCLI(args=list(args) if args is not None else None, run=run)
