"""Command line: ``python train.py {fit,validate,test,methods} --config configs/....yaml`` (or ``adamerge ...``;
``adamerge reproduce`` is :mod:`adamerge.reproduce`, dispatched by :mod:`adamerge.console`).

A :class:`lightning.pytorch.cli.LightningCLI` over the test-time systems (``model: class_path:
AdaMerging`` — every module of :mod:`adamerge.systems`, the pools and the data sources are imported
before parsing, so short class names work and ``fit --help`` lists them) and the test-time
DataModule. The task list is written once, in the data section, and linked into the system
(``data.tasks → model.init_args.tasks``), so a pool, its heads and its data can't disagree about
which tasks are merged. The optimizer is the system's own ``model.init_args.optimizer`` (Lightning's
``--optimizer``/``--lr_scheduler`` are off); ``predict`` is not offered. ``methods`` lists the
static merges and the learnable methods, one line each, and needs no config. Every ``fit``,
``validate`` and ``test`` ends with a per-task accuracy table and the paths written
(:class:`adamerge.report.RunReport`).

Safety rules on top of Lightning's (see :mod:`adamerge.systems.runs`):

* ``--ckpt_path`` restores state only. Lightning's CLI would read the checkpoint's saved
  hyper-parameters back into the configuration (a checkpoint could switch the method, enable pickles
  or move ``export_dir``); here nothing in a checkpoint changes a configuration value.
* No run overwrites another: ``config.yaml`` and ``export_dir`` of an earlier run are refused unless
  ``--overwrite=true`` (a resumed run writes ``config.resumed-<time>.yaml`` beside its first config).
* The run folder is ``trainer.default_root_dir``, written once: the export goes to ``<run>/export``
  unless ``export_dir`` is given, and the default logger (CSV, or TensorBoard when installed) and
  checkpoints write under it too.
* YAML mappings with a repeated key are refused, naming the key (PyYAML silently keeps the last).
* From the console (:func:`entry`), an error in the configuration or the files it names ends in one
  line on stderr and exit status 2, not a traceback.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import sys
import time
import traceback
import warnings
from collections.abc import Sequence

import yaml
from jsonargparse import Namespace, get_loader, set_loader
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger

from adamerge.errors import guarded
from adamerge.files import write_text
from adamerge.report import RunReport
from adamerge.short_names import check_short_names
from adamerge.systems.runs import ConfigError, RunExistsError
from adamerge.wandb_story import WandbStory

__all__ = ["AdaMergeCLI", "ConfigError", "DuplicateKeyError", "RunConfigCallback", "entry", "learnable_methods",
           "main", "methods_text", "static_methods"]

PARSER_MODE = "adamerge_yaml"
SUBCOMMANDS = ("fit", "validate", "test")
# Imported before the parser is built: every module of these packages, and these modules (pools, sources).
PLUGIN_PACKAGES = ("adamerge.systems",)
PLUGIN_MODULES = ("adamerge.data.mini", "adamerge.data.imagefolder", "adamerge.data.hub_datasets", "adamerge.data.source",
                  "adamerge.models.open_clip_pool")


class DuplicateKeyError(ValueError):
    """A YAML mapping that gives one key twice."""


def _module_of(frame) -> str:
    return str(frame.f_globals.get("__name__", ""))


def _unwrap_build_error(error: BaseException) -> str | None:
    """The error a class raised while jsonargparse built it, named by that class, or None.

    jsonargparse reports a failed ``class_path`` instantiation as a union mismatch; the class's own
    exception is at the end of the report's exception chain (``__cause__`` / ``__context__``). The
    owner is the outermost ``__init__`` on that exception's traceback. Errors jsonargparse raised
    itself (type checks) are left to its own report.
    """
    frames = list(traceback.walk_tb(error.__traceback__))
    if not frames or not _module_of(frames[-1][0]).startswith("jsonargparse"):
        return None
    inner = error
    while (nxt := inner.__cause__ or (None if inner.__suppress_context__ else inner.__context__)) is not None:
        inner = nxt
    frames = list(traceback.walk_tb(inner.__traceback__))
    if inner is error or not frames or _module_of(frames[-1][0]).startswith("jsonargparse"):
        return None
    owner = next((type(f.f_locals["self"]).__name__ for f, _ in frames
                  if f.f_code.co_name == "__init__" and "self" in f.f_locals), None)
    return f"{owner}: {inner}" if owner else str(inner)


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


_LITLOGGER_TIP = "💡 Tip: For seamless cloud logging"


def _not_litlogger_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_LITLOGGER_TIP)


def _quiet_known_notices() -> None:
    """Two notices every run printed, each dropped by its own message (nothing else is filtered).

    * Lightning 2.6's advertisement for litlogger, logged at INFO whenever no LitLogger is among the
      loggers; no Trainer setting turns it off.
    * torch 2.14's FutureWarning for ``LeafSpec()``, which Lightning 2.6.6 (the newest release)
      still builds in ``lightning/pytorch/utilities/_pytree.py`` for every combined loader; the
      warning is matched in that module only (``pyproject.toml`` filters it the same way for pytest).
    """
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _not_litlogger_tip not in logger.filters:
            logger.addFilter(_not_litlogger_tip)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
                            category=FutureWarning, module=r"lightning\.pytorch\.utilities\._pytree")


def _prepare_wandb(logger: WandbLogger) -> None:
    """Two W&B warnings fixed at their cause: Lightning's WandbLogger always passes ``anonymous=None``,
    which wandb (0.31 here) reports as a deprecated setting; and wandb looks for a git repository from
    ``save_dir`` before anything created it ("git root ... does not exist")."""
    init = getattr(logger, "_wandb_init", None)
    if isinstance(init, dict) and init.get("anonymous", False) is None:
        del init["anonymous"]
    if logger.save_dir:
        os.makedirs(logger.save_dir, exist_ok=True)


def _import_plugins() -> None:
    """Import every module of :data:`PLUGIN_PACKAGES` and :data:`PLUGIN_MODULES`, so that jsonargparse
    knows their classes by short name and ``methods`` lists every system (a new file in
    ``adamerge/systems/`` is found with no edit here)."""
    for name in PLUGIN_PACKAGES:
        package = importlib.import_module(name)
        for info in pkgutil.iter_modules(package.__path__, f"{name}."):
            importlib.import_module(info.name)
    for name in PLUGIN_MODULES:
        importlib.import_module(name)


def _summary(obj: object) -> str:
    """The first line of ``obj``'s docstring ("" if it has none)."""
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0].strip() if doc else ""


def static_methods() -> dict[str, str]:
    """Name → one-line summary of every static merge :func:`adamerge.merging.merge_pool` runs.

    The summary is the first docstring line of the method's function; for a dispatcher without one,
    of ``adamerge.merging``'s public function or module of the same name."""
    from adamerge import merging
    from adamerge.merging import METHODS

    out = {}
    for name, fn in METHODS.items():
        candidates = [fn, getattr(merging, name, None), sys.modules.get(f"adamerge.merging.{name}")]
        out[name] = next((s for s in map(_summary, candidates) if s), "")
    return out


def learnable_methods() -> dict[str, type]:
    """Short name → class of every public :class:`~adamerge.systems.base.TestTimeSystem` subclass,
    found by walking ``__subclasses__()`` after importing every module of :mod:`adamerge.systems`
    (a class that sets ``abstract = True`` in its own body is a base of methods and is left out)."""
    from adamerge.systems.base import TestTimeSystem

    _import_plugins()
    found: dict[str, type] = {}
    stack = list(TestTimeSystem.__subclasses__())
    while stack:
        cls = stack.pop(0)
        public = "<locals>" not in cls.__qualname__ and "._" not in f"{cls.__module__}.{cls.__qualname__}"
        if public and not cls.__dict__.get("abstract", False):  # a base of methods, not one itself
            found.setdefault(cls.__name__, cls)
        stack.extend(cls.__subclasses__())
    return dict(sorted(found.items(), key=lambda kv: kv[0].lower()))


def methods_text() -> str:
    """What ``adamerge methods`` prints: every static merge and every learnable method, one line each."""
    from adamerge.merging.dispatch import out_of_core

    static, learnable = static_methods(), {n: _summary(c) for n, c in learnable_methods().items()}
    width = max(map(len, [*static, *learnable]))
    lines = ["Static merges (Surgery's and WEMoE's base_merge: {method: NAME, ...}; merge_pool(pool, NAME)):"]
    lines += [f"  {n.ljust(width)}  {s}" for n, s in static.items()]
    lines += ["", "Learnable methods (model: {class_path: NAME}; python train.py fit --help lists their options):"]
    lines += [f"  {n.ljust(width)}  {s}" for n, s in learnable.items()]
    lines += ["", ("adamerge merge of Hugging Face models, out of core (one tensor of each model in memory at a "
                   "time; the result is the in-memory merge exactly) or not:")]
    for kind, what in (("per tensor", "per tensor"), ("exact passes", "in exact passes over the files"),
                       (None, "in memory only (--in_memory)")):
        names = [n for n in static if out_of_core(n) == kind]
        lines.append(f"  {what}: {', '.join(names) or 'none'}")
    return "\n".join(lines)


class RunConfigCallback(SaveConfigCallback):
    """Lightning's config saver, but atomic and never over another run's ``config.yaml``.

    An existing ``config.yaml`` in the log folder is refused (unless ``overwrite``); a run resumed
    with ``--ckpt_path`` into its own folder writes ``config.resumed-<UTC time>.yaml`` beside it.
    ``config_path`` is where it wrote (None before, and on other ranks than 0).
    """

    config_path: str | None = None

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
            self.config_path = path
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)


def _export_into_the_run_folder(config: Namespace) -> None:
    """The run folder is written once, as ``trainer.default_root_dir``: a system's ``export_dir`` left
    unset becomes ``<run folder>/export`` (the default logger writes under the run folder too)."""
    root = config.get("trainer.default_root_dir")
    model = config.get("model")
    if root is None or not isinstance(model, Namespace) or not isinstance(model.get("init_args"), Namespace):
        return
    if "export_dir" in model.init_args and model.init_args.export_dir is None:
        model.init_args.export_dir = os.path.join(str(root), "export")


class AdaMergeCLI(LightningCLI):
    """LightningCLI with adamerge's links, defaults (seed 0), run-safety rules, short class names, the
    ``methods`` listing and the end-of-run report (module docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        from adamerge.data.datamodule import TestTimeDataModule
        from adamerge.systems.base import TestTimeSystem

        _import_plugins()
        _quiet_known_notices()
        kwargs.setdefault("model_class", TestTimeSystem)
        kwargs.setdefault("datamodule_class", TestTimeDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_callback", RunConfigCallback)
        kwargs.setdefault("auto_configure_optimizers", False)  # one optimizer option: the system's own
        defaults = dict(kwargs.pop("trainer_defaults", None) or {})
        callbacks = defaults.get("callbacks", [])
        defaults["callbacks"] = [*(callbacks if isinstance(callbacks, list) else [callbacks]), RunReport()]
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("description", "adamerge: test-time model merging. `methods` lists the methods; "
                                 "fit, validate and test run one (SUBCOMMAND --help for its options).")
        for name in (None, *self.subcommands()):
            target = parser_kwargs if name is None else parser_kwargs.setdefault(name, {})
            target.setdefault("parser_mode", PARSER_MODE)
        super().__init__(*args, trainer_defaults=defaults, parser_kwargs=parser_kwargs, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """``fit``, ``validate`` and ``test`` (not ``predict``: no system predicts); ``methods`` is added
        beside them by :meth:`_add_subcommands`."""
        return {k: v for k, v in LightningCLI.subcommands().items() if k in SUBCOMMANDS}

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        super()._add_subcommands(parser, **kwargs)
        summary = "List the static merges and the learnable methods, one line each (needs no config)."
        listing = self.parser_class(description=summary)
        parser._subcommands_action.add_subcommand("methods", listing, help=summary)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("validate", "test"):
            # Lightning's results table has one column per dataloader and repeats every metric logged at
            # epoch end (all of ours) in each; RunReport prints them once. --verbose=true brings it back.
            parser.set_defaults(verbose=False)
        return parser

    @property
    def _listing(self) -> bool:
        return self.subcommand == "methods"

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--overwrite", type=bool, default=False,
            help="Replace the config.yaml and export_dir of an earlier run (refused otherwise).",
        )
        # The task list comes from the data (after it is instantiated) and is never written twice.
        parser.link_arguments("data.tasks", "model.init_args.tasks", apply_on="instantiate")
        # Class names and templates come from the data's task registry, so models/ needs none.
        parser.link_arguments("data.task_info", "model.init_args.pool.init_args.task_info", apply_on="instantiate")
        # A benchmark pool serves the data's benchmark (MiniBenchmarkPool): preset, seed and cache written once.
        parser.link_arguments("data.source", "model.init_args.pool.init_args.source", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """Parse ``args``, or ``sys.argv`` when it is None. Lightning warns when both are set; given ``args``
        (``main(args)`` from Python, the demo) are the whole command line and ``sys.argv`` is not read."""
        if not isinstance(args, (dict, Namespace)):
            check_short_names(sys.argv[1:] if args is None else args)
        self.config = parser.parse_object(args) if isinstance(args, (dict, Namespace)) else parser.parse_args(args)

    def _parse_ckpt_path(self) -> None:
        """A checkpoint restores state, never configuration: Lightning's hparams merge is turned off."""

    def _set_seed(self) -> None:
        if not self._listing:
            super()._set_seed()

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        self.save_config_kwargs = {**self.save_config_kwargs, "overwrite": bool(config.get("overwrite", False))}
        _export_into_the_run_folder(config)

    def instantiate_classes(self) -> None:
        if self._listing:  # nothing to build
            self.config_init, self.model, self.datamodule, self.trainer = self.config, None, None, None
            return
        try:
            super().instantiate_classes()
        except ValueError as e:
            message = _unwrap_build_error(e)
            if message is None:
                raise
            raise ConfigError(message) from e

    def after_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        if hasattr(self.model, "overwrite"):
            self.model.overwrite = bool(config.get("overwrite", False))
        wandb = [lg for lg in self.trainer.loggers if isinstance(lg, WandbLogger)] if self.trainer is not None else []
        for logger in wandb:
            _prepare_wandb(logger)
        if wandb and not any(isinstance(c, WandbStory) for c in self.trainer.callbacks):
            self.trainer.callbacks.append(WandbStory())  # per-task accuracy and each method's diagnostics

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand == "methods":
            print(methods_text(), flush=True)
            return
        super()._run_subcommand(subcommand)


def main(args: Sequence[str] | None = None, run: bool = True) -> AdaMergeCLI:
    """Run the CLI (errors propagate; for Python callers and tests)."""
    return AdaMergeCLI(args=list(args) if args is not None else None, run=run)


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors of a run's configuration that :func:`adamerge.errors.guarded` reports in one line,
    besides :class:`~adamerge.errors.AdaMergeError` and :class:`FileNotFoundError`."""
    from adamerge.systems.runs import CheckpointMismatchError

    return (CheckpointMismatchError, RunExistsError, DuplicateKeyError, ConfigError)


def entry(args: Sequence[str] | None = None) -> None:
    """Entry point of ``train.py``: :func:`main` under :func:`~adamerge.errors.guarded`."""
    guarded(main, sys.argv[1:] if args is None else args, user_errors())
