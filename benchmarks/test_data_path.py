"""The decoded-image cache in process, each figure a ratio against a plain equivalent measured in
the same run:

- building the cache (``harness.data.cache.load_decoded``: decode, resize, write to the mapped
  file) against a plain loop of PIL decode + resize + center crop over the same files with the
  same number of threads (``data_at_scale.plain_decode_rate``); 0.8x or more wanted;
- listing the domain's files, keying, mapping the built cache and splitting the domain (what a
  second run does before its first trial): seconds, at 10,000 and 100,000 images;
- a training epoch reading the mapped cache, resident and streamed through the loader, against the
  same images as one in-memory tensor (today's path for a domain that fits); 0.9x or more wanted.

Sizes as in ``test_data_scale.py``: ``BENCH_DATA_SIZES`` (default 10000), ``BENCH_IMAGE_SIZE``
(default 64, so the stored size is 73), ``BENCH_DATA_DIR``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
from data_at_scale import make_photo_folders, plain_decode_rate

from harness.api import DomainData, ImageFiles
from harness.data.cache import decode_threads, load_decoded
from harness.data.domains import as_domain
from harness.fileio import cache_dir
from harness.training.engine import Precision, TrainConfig, Trainer, TransferModel
from harness_plugins.datasets import build_folder
from harness_plugins.heads import build_linear
from harness_plugins.strategies import FineTune
from harness_plugins.timm_backbones import build_timm_backbone

SIZES = [int(s.lower().replace("k", "000")) for s in os.environ.get("BENCH_DATA_SIZES", "10000").split(",")]  # fmt: skip
IMAGE_SIZE = int(os.environ.get("BENCH_IMAGE_SIZE", 64))
STORED = round(IMAGE_SIZE * 8 / 7)
DATA_DIR = Path(os.environ.get("BENCH_DATA_DIR") or cache_dir() / "bench-photos")
CPU = torch.device("cpu")


def _files(n: int) -> ImageFiles:
    """Domain ``a`` of the ``n``-image folders, as the ``folder`` dataset lists it."""
    root = make_photo_folders(DATA_DIR / f"photos-{n}", n)
    return build_folder("a", image_size=IMAGE_SIZE, seed=0, root=str(root))


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"{n // 1000}k")
def test_cache_build_against_a_plain_decode_loop(benchmark, n, tmp_path, monkeypatch):
    files = _files(n)
    monkeypatch.setenv("HARNESS_CACHE_DIR", str(tmp_path))  # a cache built here, then mapped
    threads = decode_threads()
    plain = plain_decode_rate(files.paths, STORED, threads)
    start = time.perf_counter()
    built = load_decoded(files, STORED, "", lambda _: None)
    rate = len(files.paths) / (time.perf_counter() - start)
    assert built.built
    start = time.perf_counter()  # what a later run does: list the files, key, map and split
    listed = build_folder("a", image_size=IMAGE_SIZE, seed=0, root=str(files.paths[0].parents[2]))
    data = as_domain(listed, STORED, seed=0, log=lambda _: None)
    mapped_s = time.perf_counter() - start
    benchmark.extra_info.update(
        images=len(files.paths),
        threads=threads,
        plain_img_s=round(plain),
        cache_img_s=round(rate),
        ratio=round(rate / plain, 3),
        map_and_split_s=round(mapped_s, 3),
    )
    print(
        f"\n{len(files.paths)} images at {STORED} px, {threads} threads: plain {plain:.0f} img/s, "
        f"cache build {rate:.0f} img/s ({rate / plain:.2f}x); a later run lists, keys, maps and "
        f"splits it in "
        f"{mapped_s:.2f} s ({len(data.train)} train images)"
    )
    benchmark.pedantic(lambda: None, rounds=1)


def _model() -> TransferModel:
    torch.manual_seed(0)
    bb = build_timm_backbone("test_resnet", weights="none")
    return TransferModel(bb, build_linear(backbone=bb, num_classes=10, task="classification"))


def _epoch_rate(source: DomainData, stream: bool) -> float:
    cfg = TrainConfig(
        epochs=1, batch_size=64, backbone_lr=1e-3, head_lr=1e-2, weight_decay=0.0,
        freeze_depth=0, augment="light", seed=0, device=CPU, precision=Precision.for_device(CPU),
        stream=stream,
    )  # fmt: skip
    trainer = Trainer(_model(), FineTune(), source, source, cfg)
    start = time.perf_counter()
    trainer.fit()
    return len(source.train) / (time.perf_counter() - start)


def test_training_from_the_mapped_cache_against_in_memory(benchmark):
    files = _files(min(SIZES))
    mapped = as_domain(files, STORED, seed=0, log=lambda _: None)
    pool = mapped.train.store_x.clone()  # the same pixels as one in-memory tensor
    labels = torch.tensor(files.labels)
    memory = DomainData(
        name="memory",
        task="classification",
        class_names=mapped.class_names,
        train=type(mapped.train)(pool, labels, mapped.train.index),
        val=mapped.val,
        test=mapped.test,
        fingerprint="memory",
    )
    _epoch_rate(memory, False)  # warm up the allocator and the model's first calls
    rates = {
        "memory": _epoch_rate(memory, False),
        "mapped": _epoch_rate(mapped, False),
        "mapped, streamed": _epoch_rate(mapped, True),
    }
    benchmark.extra_info.update({k: round(v) for k, v in rates.items()})
    benchmark.extra_info["ratios"] = {k: round(v / rates["memory"], 3) for k, v in rates.items()}
    print(
        "\n"
        + ", ".join(f"{k} {v:.0f} img/s ({v / rates['memory']:.2f}x)" for k, v in rates.items())
    )
    benchmark.pedantic(lambda: None, rounds=1)
