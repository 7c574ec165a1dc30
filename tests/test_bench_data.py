"""The data-path benchmarks' generator and helpers (``benchmarks/data_at_scale.py``) at tiny size."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
from PIL import Image

from harness.api import DatasetError
from harness.study import load_study

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "data_at_scale.py"
_spec = importlib.util.spec_from_file_location("data_at_scale", _PATH)
das = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("data_at_scale", das)
_spec.loader.exec_module(das)

N, SIZE = 40, 64


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in das.photo_files(root)}


def test_photo_folders_deterministic_with_layout(tmp_path):
    one = das.make_photo_folders(tmp_path / "one", N, size=SIZE, threads=2)
    two = das.make_photo_folders(tmp_path / "two", N, size=SIZE, threads=1)
    files = _tree(one)
    assert files == _tree(two)  # same bytes, whatever the threads
    assert sorted(p.name for p in one.iterdir() if not p.name.startswith(".")) == ["a", "b"]
    for domain in ("a", "b"):
        classes = sorted(p.name for p in (one / domain).iterdir())
        assert classes == [f"c{c:02d}" for c in range(10)]
        assert all(len(list((one / domain / c).iterdir())) == 2 for c in classes)
    assert len(files) == N and not (tmp_path / "one.partial").exists()
    with Image.open(one / "a" / "c03" / "a_000003.jpg") as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (SIZE, SIZE))
    # the domains differ in style: b is faded towards grey
    spread = {}
    for domain in ("a", "b"):
        rgb = [das.plain_decode(p, SIZE).astype(int) for p in (one / domain).glob("*/*.jpg")]
        spread[domain] = sum(abs(x[..., 0] - x[..., 2]).mean() for x in rgb) / len(rgb)
    assert spread["b"] < 0.5 * spread["a"]


def test_marker_reused_and_rebuilt(tmp_path):
    root = das.make_photo_folders(tmp_path / "d", N, size=SIZE)
    marker = json.loads((root / das.MARKER).read_text())
    assert marker["n_images"] == N and marker["size"] == SIZE
    first = root / "b" / "c00" / "b_000000.jpg"
    stamp = first.stat().st_mtime_ns
    das.make_photo_folders(root, N, size=SIZE)  # same parameters: nothing written
    assert first.stat().st_mtime_ns == stamp
    das.make_photo_folders(root, N + 20, size=SIZE)  # other parameters: rebuilt
    assert len(das.photo_files(root)) == N + 20
    assert das.read_marker(root)["n_images"] == N + 20


def test_foreign_folder_refused(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DatasetError, match="not a generated dataset"):
        das.make_photo_folders(tmp_path / "mine", N, size=SIZE)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_plain_decode_rate_and_study(tmp_path):
    root = das.make_photo_folders(tmp_path / "d", N, size=SIZE)
    files = das.photo_files(root)
    assert das.plain_decode(files[0], 32).shape == (32, 32, 3)
    assert das.plain_decode_rate(files, 32, threads=2) > 0
    study = das.write_study(tmp_path / "s.toml", root, 32, trials=2)
    spec = load_study(str(study))
    assert spec.budget.trials == 2 and spec.final_seeds == 1
    assert spec.pairs[0].source == "photos/a" and spec.methods[0].backbone == "test_resnet"


def test_memory_readers_and_log_timing(tmp_path):
    status = das.proc_status(os.getpid())
    assert status["VmHWM"] >= status["VmRSS"] > 0 and "RssAnon" in status
    assert das.smaps_rollup(os.getpid())["USS"] > 0
    mapped = tmp_path / "m.bin"
    mapped.write_bytes(b"\1" * (1 << 20))
    script = (
        "import mmap, sys, time; f = open(sys.argv[1], 'rb');"
        "m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ); sum(m[::4096]);"
        "print('study x: 1 pair(s) x 1 method(s)'); time.sleep(0.6);"
        "print('a->b/ft: trial 0 complete 0.5000  [1/1, best 0.5000, 0s]')"
    )
    run = das.run_child(
        [sys.executable, "-c", script, str(mapped)],
        sample=lambda pid: das.mapped_usage(pid, tmp_path),
        interval_s=0.05,
    )
    assert run.returncode == 0 and run.max_rss_kb > 0 and run.peak["RssAnon"] > 0
    assert max(s["Rss"] for s in run.samples) == 1024  # every page of the mapping touched
    timing = das.first_trial_timing(run.lines)
    assert 0.5 < timing["header_to_first_trial_line_s"] < 5
    assert das.descendants(os.getpid()) == []
