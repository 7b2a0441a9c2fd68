"""``adamerge reproduce``: from Hub ids to a paper's results table, in one command.

    adamerge reproduce --model ViT-B-32 --tasks 8                  # everything, official settings
    adamerge reproduce --model ViT-B-32 --tasks 8 --dry-run        # what it would download and run
    adamerge reproduce --model ViT-L-14 --tasks 8 --methods ties adamerging_layer --devices 2

What it takes, through huggingface_hub's cache (``HF_HOME``, ``HF_HUB_OFFLINE``, ``HF_TOKEN``): the
pretrained CLIP as FusionBench names it (``openai/clip-vit-base-patch32``, an HF CLIPModel, run as
open_clip's ``ViT-B-32-quickgelu``), FusionBench's experts (``tanganke/clip-vit-base-patch32_<task>``)
and the test split of each task's dataset (:data:`adamerge.data.hub_datasets.FUSIONBENCH_DATASETS`).
What it runs (:data:`METHODS`): zero-shot, the experts, the static merges with their defaults (the
AdaMerging papers' baselines), and the test-time methods through the real ``adamerge fit`` with the
paper setup (``configs/paper/<model>/tasks<N>.yaml``) and the official method fragments
(``configs/method/*_official.yaml``, ``*_published.yaml``).

What it writes, under ``--out`` (default ``runs/reproduce/<model>-tasks<N>``): ``setup.yaml`` (the run
setup every method shares; a folder made with another setup is refused, so runs never mix), one folder
per method with its ``metrics.json`` record (a test-time method's in ``<method>/export/``), and the
table ``results/results.{md,csv,json}`` (one set, replaced whole): our per-task and average accuracy,
the published average beside it (:mod:`adamerge.reproduce.published`: FusionBench's re-run with the same
checkpoints where there is one, else the paper's) and the difference. A rerun skips every method whose
record exists and resumes an interrupted test-time method from its last checkpoint.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from adamerge.reproduce.catalog import METHODS, MODELS, ReproduceError

__all__ = ["ReproduceError", "main", "parse_args"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="adamerge reproduce", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32", help=f"one of {', '.join(MODELS)}")
    p.add_argument("--tasks", default="8", help="a task set (8, 14, 20) or task names separated by commas")
    p.add_argument("--methods", nargs="+", default=None, help=f"default all: {' '.join(m.key for m in METHODS)}")
    p.add_argument("--out", default=None, help="results folder (default runs/reproduce/<model>-tasks<N>)")
    p.add_argument("--devices", type=int, default=1, help="GPUs for the test-time methods (DDP when > 1)")
    p.add_argument("--dry-run", action="store_true", help="print what would be downloaded (sizes) and run")
    p.add_argument("--eval-batch-size", type=int, default=None, help="evaluation batch (default the setup's)")
    p.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (default the setup's)")
    p.add_argument("--steps", type=int, default=None,
                   help="override every test-time method's steps (a quick check, not the official run)")
    g = p.add_argument_group("other checkpoints and data (default: FusionBench's on the Hub)")
    g.add_argument("--arch", default=None, help="open_clip architecture the weights run as")
    g.add_argument("--model-config", default=None, help="open_clip model-config JSON for --arch")
    g.add_argument("--pretrained", default=None, help="pretrained CLIP: Hub id or path")
    g.add_argument("--experts", default=None, help="expert id pattern, {task} = FusionBench's task name")
    g.add_argument("--expert", action="append", default=[], metavar="TASK=ID", help="one task's expert")
    g.add_argument("--dataset", action="append", default=[], metavar="TASK=REPO",
                   help="one task's dataset repo (org/name[@revision][:subset])")
    g.add_argument("--image-folders", default=None,
                   help="folder of image folders (<dir>/<task>/test/<class>/*): tasks found there are read from it")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str:
    """Run ``adamerge reproduce`` (errors propagate; the console entry turns them into one line)."""
    from adamerge.reproduce.runner import run
    from adamerge.reproduce.setup import resolve
    from adamerge.reproduce.table import write_table

    args = parse_args(argv)
    setup = resolve(args)
    if args.dry_run:
        from adamerge.reproduce.plan import plan

        text = plan(setup)
        print(text, flush=True)
        return text
    run(setup)
    folder, markdown = write_table(setup)
    print(markdown + f"\nwritten: {folder}/results.md, results.csv, results.json", flush=True)
    return markdown
