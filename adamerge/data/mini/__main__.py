"""Build (or load) the mini benchmark from the command line and print its manifest metrics.

    python -m adamerge.data.mini --preset default --seed 0 [--rebuild] [--threads N]
"""

from __future__ import annotations

import argparse
import json

import torch

from adamerge.data.mini.benchmark import MiniBenchmark
from adamerge.data.mini.model import PRESETS


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--rebuild", action="store_true", help="build again even if the cache is valid")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    b = MiniBenchmark(args.preset, args.seed, args.cache_dir, rebuild=args.rebuild).build()
    m = b.manifest
    print(json.dumps({"entry": str(b.entry), "metrics": m["metrics"], "build_seconds": m["build_seconds"],
                      "build_cpu_seconds": m["build_cpu_seconds"], "pretraining": m["pretraining"]}, indent=1))


if __name__ == "__main__":
    main()
