"""Issue #10 through the real entry point: hostile checkpoints, kills mid-export and mid-checkpoint,
runs that would overwrite others, and one-line errors for bad configuration."""

from __future__ import annotations

import pathlib

import pytest
import torch
from test_cli_ddp_resume import _checkpoint, _train, cli_args

from adamerge.cli import entry, main
from adamerge.files import read_manifest
from adamerge.systems.adamerging import AdaMerging


def _temporaries(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name)


class _Touch:
    """Unpickling this calls ``Path(marker).touch()``: stands for arbitrary code in a pickle."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_crafted_checkpoint_changes_no_configuration_and_runs_no_code(tmp_path, mini_tiny_cache):
    run = tmp_path / "run"
    run.mkdir()
    r = _train(run, mini_tiny_cache, "--trainer.max_steps=1", callbacks=_checkpoint(run / "ckpt"))
    assert r.returncode == 0, r.stderr[-3000:]
    ckpt = torch.load(run / "ckpt" / "last.ckpt", weights_only=True)
    marker, evil = tmp_path / "pwned", tmp_path / "elsewhere"
    torch.save(_Touch(str(marker)), tmp_path / "expert.pt")
    ckpt["hyper_parameters"] = {  # what Lightning's CLI would merge into the configuration
        "_class_path": "adamerge.systems.adamerging.AdaMerging",
        "model": {"class_path": "adamerge.components.adamerging.AdaMergingModel",
                  "init_args": {"granularity": "task"}},
        "export_dir": str(evil),
        "pool": {"class_path": "adamerge.models.open_clip_pool.OpenCLIPPool",
                 "init_args": {"model_name": "ViT-B-32", "pretrained": None, "allow_pickle": True,
                               "experts": {"mini_mnist": str(tmp_path / "expert.pt")}}},
    }
    torch.save(ckpt, tmp_path / "crafted.ckpt")
    torch.load(tmp_path / "crafted.ckpt", weights_only=True)  # it is a "safe" file
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    cli = main(cli_args(resumed, mini_tiny_cache, "--trainer.max_steps=2", f"--ckpt_path={tmp_path / 'crafted.ckpt'}"))
    assert not marker.exists() and not evil.exists()
    assert isinstance(cli.model, AdaMerging) and cli.model.model.granularity == "layer"
    assert cli.model.export_dir == str(resumed / "export") and (resumed / "export" / "merged.safetensors").is_file()
    assert cli.trainer.global_step == 2


def test_kill_mid_export_keeps_the_previous_export_and_the_next_start_sweeps(tmp_path, mini_tiny_cache):
    r = _train(tmp_path, mini_tiny_cache, "--trainer.max_steps=1")
    assert r.returncode == 0, r.stderr[-3000:]
    before = read_manifest(tmp_path / "export")  # verifies the hashes
    r = _train(tmp_path, mini_tiny_cache, "--trainer.max_steps=2", "--overwrite=true",
               callbacks="    - class_path: probes.KillInExport\n")
    assert r.returncode == -9, r.stderr[-3000:]
    assert read_manifest(tmp_path / "export") == before  # the whole old set, hashes intact
    assert len(_temporaries(tmp_path)) == 1  # the killed run's half-written set
    r = _train(tmp_path, mini_tiny_cache, "--trainer.max_steps=2", "--overwrite=true")
    assert r.returncode == 0, r.stderr[-3000:]
    assert _temporaries(tmp_path) == []
    assert read_manifest(tmp_path / "export")["step"] == 2


def test_kill_mid_checkpoint_keeps_the_last_good_one_and_resume_sweeps(tmp_path, mini_tiny_cache):
    ckpts = tmp_path / "ckpt"
    # torch.save calls: step 1 → epoch=0-step=1.ckpt, last.ckpt; step 2 → epoch=0-step=2.ckpt, last.ckpt (killed)
    kill = "    - class_path: probes.KillInCheckpointSave\n      init_args: {call: 4}\n"
    r = _train(tmp_path, mini_tiny_cache, "--trainer.max_steps=3", callbacks=_checkpoint(ckpts) + kill)
    assert r.returncode == -9, r.stderr[-3000:]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 1  # the previous one, whole
    assert len(_temporaries(ckpts)) == 1 and not (tmp_path / "export").exists()
    r = _train(tmp_path, mini_tiny_cache, "--trainer.max_steps=3", f"--ckpt_path={ckpts / 'last.ckpt'}",
               callbacks=_checkpoint(ckpts))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _temporaries(ckpts) == []
    assert read_manifest(tmp_path / "export")["step"] == 3
    # the resumed run kept the first config and wrote its own beside it
    assert (tmp_path / "config.yaml").is_file() and len(list(tmp_path.glob("config.resumed-*.yaml"))) == 1


def test_rerunning_a_config_into_its_folder_is_refused_unless_overwrite(tmp_path, mini_tiny_cache, capsys):
    # in-process (the subprocess version of the same three runs took 41 s of the suite's budget)
    main(cli_args(tmp_path, mini_tiny_cache, "--trainer.max_steps=1"))
    first = (tmp_path / "config.yaml").read_text()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        entry(cli_args(tmp_path, mini_tiny_cache, "--trainer.max_steps=2"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "config.yaml belongs to an earlier run" in err and "Traceback" not in err
    assert (tmp_path / "config.yaml").read_text() == first
    cli = main(cli_args(tmp_path, mini_tiny_cache, "--trainer.max_steps=2", "--overwrite=true"))
    assert cli.trainer.global_step == 2
    assert "max_steps: 2" in (tmp_path / "config.yaml").read_text()


@pytest.mark.parametrize("case,expected", [
    ("dup_yaml", "duplicate key 'lam' in a YAML mapping (lines 4 and 5)"),
    ("missing_base", "Surgery: base_merge: checkpoint not found: "),
    ("lr", "optimizer lr (param group 0) must be a positive finite number at most 10, got 1e+30"),
    ("init", "AdaMerging: init_lam 1.5 is outside the clamp range [0, 1]"),
])
def test_bad_configuration_ends_in_one_line(case, expected, tmp_path, mini_tiny_cache, capsys):
    extra: list[str] = []
    if case == "dup_yaml":
        (tmp_path / "dup.yaml").write_text(
            "model:\n  init_args:\n    base_merge:\n      lam: 0.3\n      lam: 0.5\n      method: task_arithmetic\n")
        extra = ["--config", str(tmp_path / "dup.yaml")]
    args = cli_args(tmp_path, mini_tiny_cache, "--trainer.max_steps=1", *extra)
    if case in ("dup_yaml", "missing_base"):  # a Surgery run (its base_merge is a mapping or a file)
        args[4] = str(pathlib.Path(args[4]).parent / "surgery_ta.yaml")
        if case == "missing_base":
            args.append(f"--model.init_args.base_merge={tmp_path / 'no_such_run' / 'merged.safetensors'}")
    elif case == "lr":
        args.append("--model.init_args.optimizer.init_args.lr=1e30")
    else:
        args.append("--model.init_args.model.init_args.init_lam=1.5")
    with pytest.raises(SystemExit) as e:
        entry(args)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("adamerge: error: ") and expected in err[-1], err[-3:]
    assert not any("Traceback" in line for line in err)
    assert not (tmp_path / "export").exists()


def test_a_class_error_under_jsonargparse_is_named_by_its_class_not_parsed_from_text():
    """The CLI finds a component's own error through the exception chain jsonargparse leaves, not by
    reading jsonargparse's report: a wrapper of any wording still gives the class's error and name."""
    from adamerge.cli import _unwrap_build_error

    class Aligner:
        def __init__(self, rank: int) -> None:
            raise ValueError(f"rank must be at least 1, got {rank}")

    def jsonargparse_like():  # raises from a frame whose module is jsonargparse, as the library does
        namespace = {"__name__": "jsonargparse._typehints", "Aligner": Aligner}
        exec("def adapt():\n    try:\n        Aligner(0)\n    except ValueError:\n"  # noqa: S102 (a fixed literal)
             "        raise ValueError('any wording at all')\n", namespace)
        namespace["adapt"]()

    with pytest.raises(ValueError) as wrapped:
        jsonargparse_like()
    assert _unwrap_build_error(wrapped.value) == "Aligner: rank must be at least 1, got 0"
    with pytest.raises(ValueError) as own:  # not raised by jsonargparse: left alone
        Aligner(0)
    assert _unwrap_build_error(own.value) is None
