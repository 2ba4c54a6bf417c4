"""Input pipeline throughput (samples/s) for the tiny config: the Grain pipeline in-process and with N worker
processes, against a torch `DataLoader` running the same per-sample transform with N workers."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from jaxground.bench._common import machine


def add_arguments(parser) -> None:
    parser.add_argument("--data", default="", help="shapes data dir (default: generate 2000 images in a temp dir)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=30, help="timed batches per setting (after 2 warm-up)")
    parser.add_argument("--read-threads", type=int, default=0,
                        help="Grain's record-reading threads per process (0: the tiny config's; Grain's own is 16)")


def _rate(iterator, batches: int, batch_size: int) -> float:
    for _ in range(2):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def _torch_rate(cfg, workers: int, batches: int, batch_size: int) -> float:
    import numpy as np
    import torch

    from jaxground.data.mixture import Mixture, build_source
    from jaxground.data.pipeline import make_encoder
    from jaxground.data.sample import SampleMaker

    encoder, _ = make_encoder(cfg)
    mixture = Mixture({n: build_source(e) for n, e in cfg.datasets.items()}, {n: e.weight for n, e in
                                                                                   cfg.datasets.items()}, cfg.seed)
    maker = SampleMaker(cfg, encoder, {})

    class _Dataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(mixture)

        def __getitem__(self, i):
            return maker.random_map(mixture[i], np.random.default_rng(i))

    def collate(rows):
        rows = [r for r in rows if "skip" not in r]
        return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

    loader = torch.utils.data.DataLoader(_Dataset(), batch_size=batch_size, shuffle=True, num_workers=workers,
                                         collate_fn=collate, persistent_workers=workers > 0)
    return _rate(iter(loader), batches, batch_size)


def run(args) -> int:
    print(f"machine: {machine()}", flush=True)
    from jaxground.data.pipeline import make_pipeline, pipeline_config

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if not data:
            from jaxground.data.shapes import write_dataset

            data = str(Path(tmp) / "shapes")
            write_dataset(data, train=2000, val=10, test=10)
        cfg = pipeline_config(batch_size=args.batch_size, read_threads=args.read_threads,
                              read_buffer=500 if args.read_threads else 0)
        cfg.datasets.shapes.path = data
        rates = {}
        for workers in (0, args.workers):
            cfg.workers = workers
            it = make_pipeline(cfg, training=True, process_index=0, process_count=1)
            rates[f"grain, {workers} workers"] = _rate(it, args.batches, args.batch_size)
            del it
        rates[f"torch DataLoader, {args.workers} workers"] = _torch_rate(cfg, args.workers, args.batches,
                                                                         args.batch_size)
    print(f"batch {args.batch_size}, Grain reading threads {args.read_threads}")
    for name, r in rates.items():
        print(f"{name:32s} {r:8.0f} samples/s")
    grain_n, torch_n = rates[f"grain, {args.workers} workers"], rates[f"torch DataLoader, {args.workers} workers"]
    print(f"grain / torch with {args.workers} workers: {grain_n / torch_n:.2f}x")
    return 0
