"""Every shipped YAML is instantiated through the real LightningCLI, and runs two steps."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from adamerge.cli import main
from adamerge.data.registry import get_task, task_set

ROOT = Path(__file__).resolve().parent.parent
FRAGMENT_DIRS = ("trainer", "method")  # partial configs, layered after a full run config
MINI_BASE = ROOT / "configs" / "mini" / "base.yaml"  # every mini run is this base plus one method config
PAPER = sorted((ROOT / "configs" / "paper").rglob("*.yaml"))  # model x task set; a method is layered on
# configs/llm/ runs a causal LM on HF folders: tests/test_llm_adamerging.py runs each of them on a tiny Llama
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml")
                 if p.parent.name not in (*FRAGMENT_DIRS, "llm") and p != MINI_BASE and p not in PAPER)
FRAGMENTS = sorted((ROOT / "configs" / "trainer").glob("*.yaml"))
METHOD_FRAGMENTS = sorted((ROOT / "configs" / "method").glob("*.yaml"))
VITB32_TASKS = task_set("20")  # the 8 standard tasks first, then TALL masks' 12


def _fit_two_steps(args: list[str], tmp_path: Path):
    common = [
        "--trainer.max_steps=2", "--trainer.accelerator=cpu", "--trainer.devices=1",
        "--trainer.limit_val_batches=1", "--trainer.check_val_every_n_epoch=1",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=null",
        f"--model.init_args.export_dir={tmp_path / 'export'}", "--data.init_args.steps_per_epoch=2",
        "--data.init_args.batch_size=4", "--data.init_args.num_workers=0",
    ]
    cli = main(["fit", *args, *common])
    assert cli.model.progress_step == 2  # optimizer steps, or batches read by a statistics pass (RegMean)
    assert (tmp_path / "export" / "metrics.json").exists()
    return cli


def mini(name: str) -> list[str]:
    """The ``--config`` arguments of the mini run ``name``: the base, then the method config."""
    return ["--config", str(MINI_BASE), "--config", str(ROOT / "configs" / "mini" / name)]


def _mini_overrides(cache: Path) -> list[str]:
    return [
        "--data.init_args.source.init_args.preset=tiny", f"--data.init_args.source.init_args.cache_dir={cache}",
    ]


@pytest.fixture(scope="module")
def vitb32_stand_in(tmp_path_factory):
    """Tiny open_clip files and image folders under the 20 task names, for the ViT and paper YAMLs."""
    root = tmp_path_factory.mktemp("vitb32")
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (root / "adamerge-test-vit.json").write_text(__import__("json").dumps(cfg))
    open_clip.add_model_config(root / "adamerge-test-vit.json")
    torch.manual_seed(0)
    clip = open_clip.create_model("adamerge-test-vit")
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, root / "zeroshot.safetensors")
    experts = {}
    for i, task in enumerate(VITB32_TASKS):
        g = torch.Generator().manual_seed(i)
        state = {k: (v + 0.01 * torch.randn(v.shape, generator=g)).contiguous() for k, v in clip.visual.state_dict().items()}
        experts[task] = root / f"{task}.safetensors"
        save_file(state, experts[task])
        for c, _ in enumerate(get_task(task).classnames):
            d = root / "data" / task / "test" / f"{c:03d}"
            d.mkdir(parents=True)
            Image.new("RGB", (8, 8), color=(c % 256, i * 30, 0)).save(d / "0.png")
    return root, experts


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_shipped_config_instantiates_and_runs(config, tmp_path, mini_tiny_cache, vitb32_stand_in):
    text = config.read_text()
    if "MiniBenchmarkPool" in text:
        args = [*mini(config.name), *_mini_overrides(mini_tiny_cache)]
        if "base_merge: runs/" in text:  # on a finished run's merged model: make one to point at
            from adamerge.data.mini import MiniBenchmarkPool
            from adamerge.merging import merge_pool

            pool = MiniBenchmarkPool("tiny", 0, cache_dir=str(mini_tiny_cache))
            from adamerge.files import atomic_dir

            state = {k: v.contiguous() for k, v in merge_pool(pool, "task_arithmetic", lam=0.5).items()}
            with atomic_dir(tmp_path / "adamerging_export", manifest={"method": "AdaMerging"}) as d:
                save_file(state, d / "merged.safetensors")  # an export set, as an AdaMerging run writes it
            merged = tmp_path / "adamerging_export" / "merged.safetensors"
            args.append(f"--model.init_args.base_merge={merged}")
    elif "OpenCLIPPool" in text:
        root, experts = vitb32_stand_in
        args = ["--config", str(config), "--model.init_args.pool.init_args.model_name=adamerge-test-vit",
                f"--model.init_args.pool.init_args.pretrained={root / 'zeroshot.safetensors'}",
                f"--model.init_args.pool.init_args.cache_dir={tmp_path / 'heads'}",
                f"--data.init_args.source.init_args.root={root / 'data'}",
                "--data.init_args.source.init_args.preprocess=adamerge-test-vit"]
        args += [f"--model.init_args.pool.init_args.experts.{t}={p}" for t, p in experts.items()]
    else:
        pytest.fail(f"{config}: unknown pool; teach this test how to instantiate it")
    cli = _fit_two_steps(args, tmp_path)
    assert cli.model.tasks == cli.datamodule.tasks  # linked, written once
    if "Surgery" in text:
        expected = ("SurgeryV2" if "version: v2" in text else "Surgery") + (
            " on AdaMerging" if "base_merge: runs/" in text else " on TA")
        assert cli.model.method_label == expected


@pytest.mark.parametrize("fragment", FRAGMENTS, ids=lambda p: p.name)
def test_trainer_fragments_compose_with_a_run(fragment, tmp_path, mini_tiny_cache, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cli = main(["fit", *mini("adamerging_layer.yaml"), "--config", str(fragment), *_mini_overrides(mini_tiny_cache),
                "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--data.init_args.steps_per_epoch=2",
                f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
                f"--model.init_args.export_dir={tmp_path / 'export'}", "--trainer.enable_checkpointing=false",
                "--trainer.callbacks=null"])
    assert cli.trainer.global_step == 2
    assert type(cli.trainer.logger).__name__ in fragment.read_text()
    if "WandbLogger" in fragment.read_text():  # the CLI adds the W&B story (adamerge.wandb_story) once
        from adamerge.wandb_story import WandbStory

        assert [type(c) for c in cli.trainer.callbacks].count(WandbStory) == 1
        import wandb

        wandb.finish()  # leave no run open for the next test


def test_task_list_is_linked_from_data(tmp_path, mini_tiny_cache):
    tasks = ["mini_fashion", "mini_digits"]
    cli = main([*mini("adamerging_task.yaml"), *_mini_overrides(mini_tiny_cache),
                f"--data.init_args.tasks=[{','.join(tasks)}]", f"--model.init_args.export_dir={tmp_path}"], run=False)
    assert cli.model.tasks == tasks and cli.model.model.coefficients().shape[0] == 2


def test_unknown_task_fails_before_training(tmp_path, mini_tiny_cache):
    with pytest.raises(ValueError, match="'nope'"):
        main([*mini("adamerging_task.yaml"), *_mini_overrides(mini_tiny_cache),
              "--data.init_args.tasks=[mini_fashion,nope]"], run=False)


def test_fit_writes_a_results_record(tmp_path, mini_tiny_cache):
    """A train.py run's metrics.json is a results record: the README table is built from these files."""
    from adamerge.results import collect, render_table

    cli = _fit_two_steps([*mini("adamerging_plusplus.yaml"), "--seed_everything=3",
                          *_mini_overrides(mini_tiny_cache)], tmp_path)
    [record] = collect(tmp_path / "export")
    assert record["method"] == "AdaMerging++ (layer-wise)" and record["seed"] == 3 and record["steps"] == 2
    assert record["accuracy"] == {t: pytest.approx(float(cli.trainer.callback_metrics[f"val/acc/{t}"]))
                                  for t in cli.model.tasks}
    assert "AdaMerging++ (layer-wise)" in render_table([record])


def _class_path(config: Path) -> str:
    import yaml

    return yaml.safe_load(config.read_text())["model"]["class_path"]


@pytest.mark.parametrize("fragment", METHOD_FRAGMENTS, ids=lambda p: p.name)
def test_method_fragments_layer_onto_a_mini_run(fragment, tmp_path, mini_tiny_cache):
    """``--config configs/mini/<run>.yaml --config configs/method/<m>.yaml`` runs the fragment's method."""
    runs = [c for c in CONFIGS if c.parent.name == "mini" and _class_path(c) == _class_path(fragment)
            and "base_merge: runs/" not in c.read_text()]  # not a run that needs another run's export
    assert runs, f"{fragment}: no mini run config of {_class_path(fragment)} to layer it onto"
    cli = _fit_two_steps([*mini(runs[0].name), "--config", str(fragment), *_mini_overrides(mini_tiny_cache)],
                         tmp_path)
    assert f"{type(cli.model).__module__}.{type(cli.model).__name__}" == _class_path(fragment)


def test_benchmark_settings_are_written_once_in_the_data(tmp_path, mini_tiny_cache):
    """The pool serves the data's benchmark (linked); a pool setting that disagrees is refused."""
    cli = _fit_two_steps([*mini("adamerging_task.yaml"),
                          *_mini_overrides(mini_tiny_cache)], tmp_path)
    assert cli.model.pool.benchmark.preset == "tiny" and cli.model.pool.benchmark.root == mini_tiny_cache
    assert cli.model.pool.benchmark_id == cli.datamodule.source.benchmark.benchmark_id
    with pytest.raises(ValueError, match="MiniBenchmarkPool seed=3 but the data source's is 0"):
        main(["fit", *mini("adamerging_task.yaml"),
              *_mini_overrides(mini_tiny_cache), "--model.init_args.pool.init_args.seed=3",
              "--trainer.max_steps=1"], run=True)


def test_the_run_folder_is_written_once(tmp_path, mini_tiny_cache):
    """A mini run config names its run folder once (trainer.default_root_dir): the export, the default
    logger and config.yaml go under it; an explicit export_dir still wins."""
    import yaml

    for name in [c.name for c in CONFIGS if c.parent.name == "mini"]:
        text = (ROOT / "configs" / "mini" / name).read_text()
        settings = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
        assert not [line for line in settings if "export_dir" in line or "save_dir" in line], name
        assert len([line for line in settings if "runs/mini/" in line and "base_merge:" not in line]) == 1, name
        assert yaml.safe_load(text)["trainer"]["default_root_dir"] == f"runs/mini/{Path(name).stem}"
    run = tmp_path / "run"
    cli = main(["fit", *mini("adamerging_task.yaml"), *_mini_overrides(mini_tiny_cache), f"--trainer.default_root_dir={run}",
                "--trainer.max_steps=1", "--data.init_args.steps_per_epoch=1", "--trainer.limit_val_batches=1"])
    assert cli.model.export_dir == str(run / "export") and (run / "export" / "metrics.json").is_file()
    assert Path(cli.trainer.log_dir).parent.parent == run and (Path(cli.trainer.log_dir) / "config.yaml").is_file()
    cli = main(["--config", str(MINI_BASE), "--config", str(ROOT / "configs/mini/adamerging_task.yaml"),
                *_mini_overrides(mini_tiny_cache), f"--trainer.default_root_dir={run}",
                f"--model.init_args.export_dir={tmp_path / 'elsewhere'}"], run=False)
    assert cli.model.export_dir == str(tmp_path / "elsewhere")


def test_the_vit_configs_build_the_activation_their_weights_were_trained_with():
    """The OpenAI CLIP weights (and the task_vectors / FusionBench experts fine-tuned from them) use
    QuickGELU; open_clip's plain ``ViT-B-32`` is GELU. Every shipped ViT config names the QuickGELU model,
    for the model and for the preprocessing, and open_clip builds it with QuickGELU."""
    import yaml

    vit = [c for c in CONFIGS if c.parent.name == "vitb32"]
    assert vit
    for config in vit:
        cfg = yaml.safe_load(config.read_text())
        name = cfg["model"]["init_args"]["pool"]["init_args"]["model_name"]
        assert name == "ViT-B-32-quickgelu", config
        assert cfg["data"]["init_args"]["source"]["init_args"]["preprocess"] == name, config
    assert open_clip.get_model_config("ViT-B-32-quickgelu")["quick_gelu"] is True
    assert not open_clip.get_model_config("ViT-B-32").get("quick_gelu", False)


PAPER_METHODS = ["adamerging_official.yaml", "adamerging_plusplus_official.yaml", "surgery_official.yaml",
                 "wemoe_published.yaml", "ewemoe_published.yaml"]


@pytest.mark.parametrize("setup", PAPER, ids=lambda p: str(p.relative_to(ROOT / "configs" / "paper")))
def test_every_paper_config_runs_two_steps_with_an_official_method(setup, tmp_path, vitb32_stand_in):
    """configs/paper/<model>/tasks<N>.yaml + one official method fragment, on random tiny weights: the
    task set is the registry's, the model is the QuickGELU one, and two steps run."""
    import yaml

    text = yaml.safe_load(setup.read_text())
    n = setup.stem.removeprefix("tasks")
    tasks = task_set(n)
    pool_args = text["model"]["init_args"]["pool"]["init_args"]
    assert list(pool_args["experts"]) == tasks and text["data"]["init_args"]["source"]["init_args"]["tasks"] == tasks
    assert pool_args["model_name"].endswith("-quickgelu")
    assert text["data"]["init_args"]["source"]["init_args"]["preprocess"] == pool_args["model_name"]
    method = PAPER_METHODS[PAPER.index(setup) % len(PAPER_METHODS)]
    root, experts = vitb32_stand_in
    args = ["--config", str(setup), "--config", str(ROOT / "configs" / "method" / method),
            "--model.init_args.pool.init_args.model_name=adamerge-test-vit",
            f"--model.init_args.pool.init_args.pretrained={root / 'zeroshot.safetensors'}",
            f"--model.init_args.pool.init_args.cache_dir={root / 'heads'}",
            f"--data.init_args.source.init_args.root={root / 'data'}",
            "--data.init_args.source.init_args.preprocess=adamerge-test-vit",
            *[f"--model.init_args.pool.init_args.experts.{t}={experts[t]}" for t in tasks]]
    cli = _fit_two_steps(args, tmp_path)
    assert cli.model.tasks == tasks
