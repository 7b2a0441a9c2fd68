"""Issue #11, "a CLI that reports": ``methods``, short class names, one optimizer option, no ``predict``,
and the per-task accuracy / paths report at the end of ``fit`` and ``test``, through the real entry point."""

from __future__ import annotations

import importlib
import json
import logging
import pkgutil
import re
import warnings
from pathlib import Path

import pytest
from test_cli_ddp_resume import CONFIG, _checkpoint, cli_args

import adamerge.systems
from adamerge.cli import _prepare_wandb, entry, main
from adamerge.merging import METHODS, ties_merge
from adamerge.systems.adamerging import AdaMerging
from adamerge.systems.base import TestTimeSystem


def _discovered_systems() -> set[str]:
    for info in pkgutil.iter_modules(adamerge.systems.__path__, "adamerge.systems."):
        importlib.import_module(info.name)
    names, stack = set(), list(TestTimeSystem.__subclasses__())
    while stack:
        cls = stack.pop()
        if "<locals>" not in cls.__qualname__ and "._" not in f"{cls.__module__}.{cls.__qualname__}":
            names.add(cls.__name__)
        stack.extend(cls.__subclasses__())
    names.discard("StatisticsMerge")  # the base of RegMean and Fisher merging, not a method
    return names


def _section(out: str, title: str) -> dict[str, str]:
    """``{name: summary}`` of the indented lines under the line starting with ``title``."""
    lines = out.split(title, 1)[1].splitlines()[1:]
    rows = {}
    for line in lines:
        if not line.startswith("  "):
            break
        name, _, summary = line.strip().partition(" ")
        rows[name] = summary.strip()
    return rows


def _row(out: str, name: str) -> list[str]:
    """The cells of the report's table row ``name`` (exactly one such row)."""
    rows = [line.split() for line in out.splitlines() if line.split()[:1] == [name]]
    assert len(rows) == 1, (name, out)
    return rows[0][1:]


def test_methods_lists_every_static_merge_and_learnable_method_without_a_config(capsys):
    cli = main(["methods"])
    assert cli.trainer is None and cli.model is None  # nothing was built
    out = capsys.readouterr().out
    static = _section(out, "Static merges")
    learnable = _section(out, "Learnable methods")
    assert list(static) == list(METHODS)
    assert set(learnable) == _discovered_systems() >= {"AdaMerging", "WEMoE", "Surgery", "RegMean", "FisherMerging"}
    assert static["ties"] == ties_merge.__doc__.strip().splitlines()[0]
    assert learnable["AdaMerging"] == AdaMerging.__doc__.strip().splitlines()[0]
    assert all(static.values()) and all(learnable.values())  # every method has a summary
    entry(["methods"])  # the console entry too: no config, no error
    assert "AdaMerging" in capsys.readouterr().out


def test_predict_is_not_a_subcommand(tmp_path, mini_tiny_cache, capsys):
    args = cli_args(tmp_path, mini_tiny_cache)
    args[0] = "predict"
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    assert "invalid choice: 'predict'" in capsys.readouterr().err


def test_one_optimizer_option_and_help_lists_the_systems(capsys, tmp_path, mini_tiny_cache):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--optimizer" not in text and "--lr_scheduler" not in text
    known = re.sub(r"\s+", " ", text.split("--model CONFIG", 1)[1].split("--data.help", 1)[0])
    for name in ("adamerge.systems.adamerging.AdaMerging", "adamerge.systems.wemoe.WEMoE",
                 "adamerge.systems.surgery.Surgery"):
        assert name in known
    with pytest.raises(SystemExit) as e:
        main(cli_args(tmp_path, mini_tiny_cache, "--optimizer=torch.optim.SGD"))
    assert e.value.code == 2 and "--optimizer" in capsys.readouterr().err


def test_short_class_names_in_yaml_and_on_the_command_line(tmp_path, mini_tiny_cache):
    short = tmp_path / "short.yaml"
    short.write_text(CONFIG.read_text().replace("class_path: adamerge.systems.adamerging.AdaMerging", "class_path: AdaMerging")
                     .replace("class_path: adamerge.data.mini.MiniBenchmarkPool", "class_path: MiniBenchmarkPool"))
    assert "class_path: AdaMerging" in short.read_text() and "class_path: MiniBenchmarkPool" in short.read_text()
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    args = cli_args(tmp_path / "a", mini_tiny_cache, "--trainer.max_steps=3")
    args[4] = str(short)
    a = main(args)
    assert type(a.model) is AdaMerging and a.trainer.global_step == 3
    saved = (tmp_path / "a" / "config.yaml").read_text()
    assert "class_path: adamerge.systems.adamerging.AdaMerging" in saved  # recorded by its full path
    # --model NAME after a config with the full path: the class stays, its init_args are kept
    b = main(cli_args(tmp_path / "b", mini_tiny_cache, "--trainer.max_steps=3", "--model=AdaMerging"))
    assert type(b.model) is AdaMerging and b.trainer.global_step == 3

    def settings(cli):
        return {k: v for k, v in cli.model.hparams.items() if k != "export_dir"}

    assert settings(b) == settings(a) and len(settings(a)) > 1


def test_fit_ends_with_per_task_accuracy_and_the_paths_written(tmp_path, mini_tiny_cache, capsys):
    # 3 steps = one epoch of cli_args' data: validated once, at the end
    cli = main(cli_args(tmp_path, mini_tiny_cache, "--trainer.max_steps=3", callbacks=_checkpoint(tmp_path / "ckpt")))
    out = capsys.readouterr().out
    model, metrics = cli.model, cli.model.last_metrics
    assert model.last_metrics_step == 3 and f"adamerge fit: {model.method_label}, step 3" in out and "validated at step 3" in out
    manifest = json.loads((cli.model.pool.benchmark.entry / "manifest.json").read_text())
    for task in model.tasks:
        cells = _row(out, task)
        assert cells[0] == f"{100 * metrics[f'val/acc/{task}']:.2f}"
        expert = manifest["metrics"]["expert"][task]  # percent
        assert cells[1] == f"{expert:.2f}"
        assert cells[2] == ("-" if expert == 0 else f"{100 * 100 * metrics[f'val/acc/{task}'] / expert:.2f}")
    assert _row(out, "average")[0] == f"{100 * metrics['val/acc/avg']:.2f}"
    export = Path(model.export_dir)
    line = next(x for x in out.splitlines() if x.strip().startswith("export"))
    assert str(export) in line
    for name in ("merged.safetensors", "metrics.json", "manifest.json"):  # printed after the export was written
        assert name in line
    assert f"checkpoint  {tmp_path / 'ckpt' / 'last.ckpt'}" in out
    assert f"config      {tmp_path / 'config.yaml'}" in out


def test_test_prints_each_accuracy_once(tmp_path, mini_tiny_cache, capsys):
    args = cli_args(tmp_path, mini_tiny_cache)
    args[0] = "test"
    cli = main([*args, "--trainer.limit_test_batches=1"])
    out = capsys.readouterr().out
    assert "DataLoader" not in out  # Lightning's per-dataloader table repeated every metric in each column
    for task in cli.model.tasks:
        assert _row(out, task)[0] == f"{100 * cli.model.last_metrics[f'test/acc/{task}']:.2f}"
    assert _row(out, "average")[0] == f"{100 * cli.model.last_metrics['test/acc/avg']:.2f}"
    assert "export " not in out  # test writes no export
    # Lightning's table is still there on request
    main([*args, "--trainer.limit_test_batches=1", "--verbose=true", "--overwrite=true"])
    assert "DataLoader 5" in capsys.readouterr().out


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_runs_print_no_litlogger_tip_nor_pytree_warning(tmp_path, mini_tiny_cache):
    logger, records = logging.getLogger("lightning.pytorch.utilities.rank_zero"), _Records()
    logger.addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            main(cli_args(tmp_path, mini_tiny_cache, "--trainer.max_steps=3"))
    finally:
        logger.removeHandler(records)
    assert not [w for w in caught if "LeafSpec" in str(w.message)]
    assert any("GPU available" in m for m in records.messages)  # Lightning's other INFO lines come through
    assert not any("litlogger" in m for m in records.messages)


def test_wandb_logger_is_prepared_so_wandb_does_not_warn(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path / "wandb_runs"), offline=True)
    assert logger._wandb_init["anonymous"] is None  # what wandb warns about
    _prepare_wandb(logger)
    assert "anonymous" not in logger._wandb_init
    assert (tmp_path / "wandb_runs").is_dir()  # wandb looks for a git root from there


def test_normalized_accuracy_only_against_expert_accuracy_of_the_same_split():
    from types import SimpleNamespace

    from adamerge.report import RunReport

    metrics = {"val/acc/a": 0.5, "val/acc/b": 0.25, "val/acc/avg": 0.375}
    mini_like = SimpleNamespace(benchmark=SimpleNamespace(manifest={"metrics": {"expert": {"a": 100.0, "b": 50.0}}}))
    module = SimpleNamespace(last_metrics=metrics, last_metrics_step=4, tasks=["a", "b"], pool=mini_like,
                             export_dir=None, method_label="Toy")

    def report(split: str) -> str:
        trainer = SimpleNamespace(datamodule=SimpleNamespace(eval_split=split), global_step=4, checkpoint_callbacks=[],
                                  callbacks=[], loggers=[])
        return RunReport().report(trainer, module, "fit")

    out = report("test")  # the mini benchmark records its experts' test accuracy
    assert _row(out, "a") == ["50.00", "100.00", "50.00"] and _row(out, "b") == ["25.00", "50.00", "50.00"]
    assert _row(out, "average") == ["37.50", "75.00", "50.00"]
    out = report("val")  # ...not on val: no normalized accuracy, and the report says why
    assert _row(out, "a") == ["50.00"] and _row(out, "average") == ["37.50"]
    assert "not shown, the pool records no expert accuracy on the val split" in out


def test_an_unknown_short_name_lists_the_close_matches(tmp_path, capsys):
    from adamerge.cli import entry

    with pytest.raises(SystemExit) as e:
        entry(["fit", "--config", str(CONFIG), "--model=AdaMergin"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[-1].startswith("adamerge: error: --model: no class named 'AdaMergin'; did you mean")
    assert "AdaMerging" in err[-1].split("did you mean", 1)[1] and len(err) == 1
    bad = tmp_path / "bad.yaml"  # in a config file, nested: the file is named
    bad.write_text("model:\n  class_path: AdaMerging\n  init_args:\n    pool:\n      class_path: MiniBenchPool\n")
    with pytest.raises(SystemExit):
        entry(["fit", "--config", str(bad)])
    assert f"{bad}: no class named 'MiniBenchPool'; did you mean MiniBenchmarkPool" in capsys.readouterr().err
