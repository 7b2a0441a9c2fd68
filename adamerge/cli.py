"""Command line: ``python train.py {fit,validate,test} --config configs/....yaml`` (or ``adamerge ...``).

A :class:`lightning.pytorch.cli.LightningCLI` over the test-time systems (``model: class_path:
adamerge.systems....``) and the test-time DataModule. The task list is written once, in the data
section, and linked into the system (``data.tasks → model.init_args.tasks``), so a pool, its heads
and its data can't disagree about which tasks are merged.

Safety rules on top of Lightning's (see :mod:`adamerge.systems.runs`):

* ``--ckpt_path`` restores state only. Lightning's CLI would read the checkpoint's saved
  hyper-parameters back into the configuration (a checkpoint could switch the method, enable pickles
  or move ``export_dir``); here nothing in a checkpoint changes a configuration value.
* No run overwrites another: ``config.yaml`` and ``export_dir`` of an earlier run are refused unless
  ``--overwrite=true`` (a resumed run writes ``config.resumed-<time>.yaml`` beside its first config).
* YAML mappings with a repeated key are refused, naming the key (PyYAML silently keeps the last).
* From the console (:func:`entry`), an error in the configuration or the files it names ends in one
  line on stderr and exit status 2, not a traceback.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Sequence

import yaml
from jsonargparse import get_loader, set_loader
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from adamerge.files import write_text
from adamerge.systems.runs import ConfigError, RunExistsError

__all__ = ["AdaMergeCLI", "ConfigError", "DuplicateKeyError", "RunConfigCallback", "entry", "main"]

PARSER_MODE = "adamerge_yaml"


class DuplicateKeyError(ValueError):
    """A YAML mapping that gives one key twice."""


_UNION = "Does not validate against any of the Union subtypes"


def _unwrap_union_error(error: ValueError) -> str | None:
    """jsonargparse reports a failed ``class_path`` instantiation as a union mismatch listing each
    subtype's error; the one that is not "Expected a NoneType" is what went wrong."""
    text = str(error)
    if _UNION not in text or "Errors:" not in text:
        return None
    body = text.split("Errors:", 1)[1].split("Given value type:", 1)[0]
    items = [line.strip()[2:] for line in body.splitlines() if line.strip().startswith("- ")]
    items = [i for i in items if not i.startswith("Expected a <class 'NoneType'>")]
    if len(items) != 1:
        return None
    found = re.search(r"class_path='([\w.]+)'", text)
    where = found.group(1).rsplit(".", 1)[-1] if found else "configuration"
    return f"{where}: {items[0]}"


def _refuse_duplicate_keys(text: str) -> None:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return  # the real loader reports syntax errors in its own words
    stack = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    if key.value in seen:
                        raise DuplicateKeyError(
                            f"duplicate key {key.value!r} in a YAML mapping (lines {seen[key.value]} and "
                            f"{key.start_mark.line + 1}): PyYAML would keep only the last one"
                        )
                    seen[key.value] = key.start_mark.line + 1
                stack.append(value)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def _load_yaml_unique(text: str):
    _refuse_duplicate_keys(text)
    return get_loader("yaml")(text)


set_loader(PARSER_MODE, _load_yaml_unique, exceptions=(yaml.YAMLError,))


class RunConfigCallback(SaveConfigCallback):
    """Lightning's config saver, but atomic and never over another run's ``config.yaml``.

    An existing ``config.yaml`` in the log folder is refused (unless ``overwrite``); a run resumed
    with ``--ckpt_path`` into its own folder writes ``config.resumed-<UTC time>.yaml`` beside it.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self.already_saved:
            return
        log_dir = trainer.log_dir
        path = os.path.join(log_dir, self.config_filename)
        if trainer.is_global_zero and not self.overwrite and get_filesystem(log_dir).isfile(path):
            if not (trainer.ckpt_path or self.config.get("ckpt_path")):
                raise RunExistsError(
                    f"{path} belongs to an earlier run: choose another log folder (trainer.default_root_dir "
                    "or the logger's save_dir) or pass --overwrite=true"
                )
            path = os.path.join(log_dir, f"config.resumed-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.yaml")
        if trainer.is_global_zero:
            write_text(path, self.parser.dump(self.config, skip_none=False))
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


class AdaMergeCLI(LightningCLI):
    """LightningCLI with adamerge's links, defaults (seed 0) and run-safety rules (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        from adamerge.data.datamodule import TestTimeDataModule
        from adamerge.systems.base import TestTimeSystem

        kwargs.setdefault("model_class", TestTimeSystem)
        kwargs.setdefault("datamodule_class", TestTimeDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_callback", RunConfigCallback)
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        for name in (None, "fit", "validate", "test", "predict"):
            target = parser_kwargs if name is None else parser_kwargs.setdefault(name, {})
            target.setdefault("parser_mode", PARSER_MODE)
        super().__init__(*args, parser_kwargs=parser_kwargs, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--overwrite", type=bool, default=False,
            help="Replace the config.yaml and export_dir of an earlier run (refused otherwise).",
        )
        # The task list comes from the data (after it is instantiated) and is never written twice.
        parser.link_arguments("data.tasks", "model.init_args.tasks", apply_on="instantiate")
        # Class names and templates come from the data's task registry, so models/ needs none.
        parser.link_arguments("data.task_info", "model.init_args.pool.init_args.task_info", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """A checkpoint restores state, never configuration: Lightning's hparams merge is turned off."""

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        self.save_config_kwargs = {**self.save_config_kwargs, "overwrite": bool(config.get("overwrite", False))}

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as e:
            message = _unwrap_union_error(e)
            if message is None:
                raise
            raise ConfigError(message) from e

    def after_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        if hasattr(self.model, "overwrite"):
            self.model.overwrite = bool(config.get("overwrite", False))


def main(args: Sequence[str] | None = None, run: bool = True) -> AdaMergeCLI:
    """Run the CLI (errors propagate; for Python callers and tests)."""
    return AdaMergeCLI(args=list(args) if args is not None else None, run=run)


def _user_errors() -> tuple[type[BaseException], ...]:
    from adamerge.errors import AdaMergeError
    from adamerge.systems.runs import CheckpointMismatchError

    return (AdaMergeError, CheckpointMismatchError, RunExistsError, DuplicateKeyError, ConfigError, FileNotFoundError)


def entry(args: Sequence[str] | None = None) -> None:
    """Entry point of ``train.py`` and the ``adamerge`` console script: configuration and file errors
    end in one line on stderr and exit status 2 (set ``ADAMERGE_TRACEBACK=1`` for the traceback)."""
    try:
        main(args)
    except _user_errors() as e:
        if os.environ.get("ADAMERGE_TRACEBACK"):
            raise
        print(f"adamerge: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
