"""One process of ``benchmarks/label_scale.py``: ``sim label`` with another way of sharing.

Run as ``accelerate launch ... -m benchmarks.label_scale_worker --share S <label options>``.
``S`` is ``interleaved`` (the product's: every N-th image), ``contiguous`` (process r takes
the r-th block of the list, like ``accelerate``'s ``split_between_processes``) or ``queue``
(a shared work queue: processes claim chunks of 2 images by creating claim files, so a
process that finishes early takes more). The alternatives live here, not in the product,
because they exist only to be measured against it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from serving.cli import label
from serving.sharding import runner
from serving.sharding.shards import Shard

CHUNK = 2


def contiguous(items: Sequence, shard: Shard) -> list:
    size = -(-len(items) // shard.world)
    return list(items[shard.rank * size:(shard.rank + 1) * size])


def queue(claims: Path):
    def share(items: Sequence, shard: Shard) -> Iterator:
        folder = claims / shard.run
        folder.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(items), CHUNK):
            try:
                os.close(os.open(folder / str(start), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                continue  # another process took this chunk
            yield from items[start:start + CHUNK]
    return share


def main(argv: list[str]) -> int:
    strategy = argv[argv.index("--share") + 1]
    rest = argv[:argv.index("--share")] + argv[argv.index("--share") + 2:]
    if strategy == "contiguous":
        runner.take_share = contiguous
    elif strategy == "queue":
        out = Path(rest[rest.index("--output") + 1])
        runner.take_share = queue(out.parent / ".claims")
    elif strategy != "interleaved":
        raise SystemExit(f"--share {strategy}: use interleaved, contiguous or queue")
    return label.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
