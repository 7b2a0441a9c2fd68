"""What reading a Hub parquet dataset costs the test-time stream: random vs in-order access per image,
next to decoding the same JPEG bytes alone.

    python benchmarks/hub_dataset_access.py [--images 2000] [--row-group 100] [--out results/hub_access.json]

``adamerge.data.hub_datasets.ParquetImageDataset`` reads one row group at a time (the ``datasets``
library writes image datasets in groups of 100 rows) and keeps a few in a small cache. Evaluation reads
in order (one group read per 100 images); the adaptation stream reads in random order, so nearly every
image costs a group read. This prints both per image, and their ratios to the decode + open_clip
transform of the same bytes (the floor any source pays), measured side by side in one run.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hubcache import parquet_split  # the tests' datasets-style writer


def _images(n: int, size: int = 224) -> list[bytes]:
    """JPEGs of about the size of the real test sets' (tens of KB at 224 px)."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (size // 4, size // 4, 3), dtype=np.uint8)
    out = []
    for i in range(n):
        arr = np.kron(np.roll(base, i, axis=0), np.ones((4, 4, 1), dtype=np.uint8))
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--row-group", type=int, default=100)
    p.add_argument("--reads", type=int, default=500, help="images timed per access pattern")
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    import open_clip

    from adamerge.data.hub_datasets import ParquetImageDataset

    images = _images(args.images)
    classes = [str(i) for i in range(10)]
    transform = open_clip.image_transform(224, is_train=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "test-00000-of-00001.parquet"
        path.write_bytes(parquet_split(images, [i % 10 for i in range(args.images)], classes,
                                       row_group_size=args.row_group))
        order = list(range(args.images))[: args.reads]
        shuffled = random.Random(0).sample(range(args.images), args.reads)

        def per_image(indices, fn) -> float:
            start = time.perf_counter()
            for i in indices:
                fn(i)
            return (time.perf_counter() - start) / len(indices) * 1e3

        decode = per_image(shuffled, lambda i: transform(Image.open(io.BytesIO(images[i])).convert("RGB")))
        in_order = per_image(order, ParquetImageDataset([path], classes, transform).__getitem__)
        at_random = per_image(shuffled, ParquetImageDataset([path], classes, transform).__getitem__)
    result = {"images": args.images, "row_group": args.row_group, "avg_jpeg_kb": sum(map(len, images)) / len(images) / 1e3,
              "ms_per_image": {"decode_only": decode, "parquet_in_order": in_order, "parquet_random": at_random},
              "ratio_to_decode": {"in_order": in_order / decode, "random": at_random / decode}}
    print(f"per image: decode + transform {decode:.2f} ms; parquet in order {in_order:.2f} ms "
          f"({in_order / decode:.2f}x); at random {at_random:.2f} ms ({at_random / decode:.2f}x)")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
