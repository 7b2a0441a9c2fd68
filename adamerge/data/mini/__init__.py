"""The built-in mini benchmark: six real-image tasks, a tiny CLIP pretrained offline, real experts.

``MiniBenchmark(preset, seed).build()`` builds it once (minutes on a laptop CPU) into a user cache
and loads it afterwards; :class:`MiniBenchmarkSource` and :class:`MiniBenchmarkPool` are thin,
LightningCLI-friendly views of the same cache entry (``class_path: adamerge.data.mini.MiniBenchmarkPool``).
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from adamerge.data.mini.benchmark import MiniBenchmark
from adamerge.data.mini.model import PRESETS, MiniConfig
from adamerge.data.mini.sources import MissingSourceError
from adamerge.data.mini.tasks import MINI_TASKS, TASK_NAMES
from adamerge.files import write_text
from adamerge.models.export import export_merged
from adamerge.models.pool import ModelPool

__all__ = [
    "MINI_TASKS",
    "PRESETS",
    "TASK_NAMES",
    "MiniBenchmark",
    "MiniBenchmarkPool",
    "MiniBenchmarkSource",
    "MiniConfig",
    "MissingSourceError",
]


class MiniBenchmarkSource:
    """The mini benchmark's datasets as a :class:`adamerge.data.source.TaskSource`.

    Args:
        preset: ``"default"`` or ``"tiny"``.
        seed: model seed of the build (the splits do not depend on it).
        cache_dir: cache root (default ``$ADAMERGE_CACHE`` / ``$XDG_CACHE_HOME/adamerge`` / ``~/.cache/adamerge``).
        build: build (or load) the models too; not needed for the data alone.
    """

    def __init__(self, preset: str = "default", seed: int = 0, cache_dir: str | None = None,
                 build: bool = True) -> None:
        self.benchmark = MiniBenchmark(preset, seed, cache_dir)
        if build:
            self.benchmark.build()

    @property
    def tasks(self) -> list[str]:
        return self.benchmark.tasks

    def dataset(self, task: str, split: str) -> Dataset:
        return self.benchmark.dataset(task, split)


class MiniBenchmarkPool(ModelPool):
    """The mini benchmark's model pool (built or loaded from the cache on construction).

    In a CLI run the benchmark is the data's: the CLI links ``data.source`` here, so preset, seed and
    cache are written once, in the data section, and pool and data cannot disagree. From Python, give
    ``source`` or the three settings.

    Args:
        preset: ``"default"`` or ``"tiny"`` (None: the source's, else ``"default"``).
        seed: model seed of the build (None: the source's, else 0).
        cache_dir: cache root (default ``$ADAMERGE_CACHE`` / ``$XDG_CACHE_HOME/adamerge`` / ``~/.cache/adamerge``).
        source: the run's :class:`MiniBenchmarkSource`, whose benchmark this pool serves; a preset,
            seed or cache given here as well must be the same.
    """

    def __init__(self, preset: str | None = None, seed: int | None = None, cache_dir: str | None = None,
                 source: object | None = None) -> None:
        if isinstance(source, MiniBenchmarkSource):
            bench = source.benchmark
            given = {"preset": preset, "seed": seed, "cache_dir": cache_dir}
            theirs = {"preset": bench.preset, "seed": bench.seed, "cache_dir": bench.root}
            for key, value in given.items():
                same = value is None or (str(Path(value)) == str(Path(theirs[key])) if key == "cache_dir"
                                         else value == theirs[key])
                if not same:
                    raise ValueError(f"MiniBenchmarkPool {key}={value!r} but the data source's is {theirs[key]!r}: "
                                     "write it once, in the data section")
            preset, seed, cache_dir = bench.preset, bench.seed, str(bench.root)
        self.benchmark = MiniBenchmark(preset or "default", 0 if seed is None else seed, cache_dir).build()
        self.clip = self.benchmark.clip_model()  # also the text tower and projections of a full export
        p = self.benchmark.pool(self.clip)
        super().__init__(p.encoder, p._experts, p.heads, logit_scale=p.logit_scale, name=p.name,
                         benchmark=p.benchmark_id)

    def export(self, visual_state, path) -> Path:
        """Write a full open_clip CLIP (this benchmark's text tower + ``visual_state``) to ``path``, and
        the model's config beside it, so that::

            open_clip.add_model_config(folder / "<model_name>.json")
            open_clip.create_model("<model_name>", pretrained=str(folder / "merged.safetensors"))

        loads it (the names are in ``pool.name``)."""
        target = export_merged(self.clip, visual_state, path)
        config = self.benchmark.paths["model_config"]
        write_text(target.parent / config.name, config.read_text(encoding="utf-8"))
        return target
