"""Data and measurements for the data-path benchmarks at 10,000 and 100,000 images
(``test_data_scale.py``).

- ``make_photo_folders``: a deterministic ``folder`` dataset (``root/<domain>/<class>/<image>``) of
  JPEG crops of the photographs scikit-learn and scikit-image ship, one photo per class, the domains
  differing by a visible style; written with threads, reused when its marker matches.
- ``plain_decode_rate``: images/s of a plain threaded PIL loop, the reference a cache build is
  compared with.
- ``run_child`` and the ``/proc`` readers: a child process's peak memory, its log lines with
  arrival times, and what its processes share of a mapped file.
- ``write_study``: a one-trial study over the generated folders."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from harness.api import DatasetError

MARKER = ".bench-photos.json"
#: bumped whenever the pixels change for the same parameters, so old folders are rebuilt
GENERATOR_VERSION = 1
JPEG_QUALITY = 90
#: each domain's look, in order: the photo as it is, faded (mostly grey, soft), tinted (warm cast)
STYLES = ("photo", "faded", "tinted")


def default_threads() -> int:
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


# ------------------------------------------------------------------------------------ generator


@lru_cache(maxsize=1)
def source_photos() -> tuple[Image.Image, ...]:
    """The installed sample photographs (``harness_plugins.photos.bundled_photos``: scikit-learn's
    china.jpg and flower.jpg, and scikit-image's colour photos where present) as RGB images."""
    from harness_plugins.photos import bundled_photos

    return tuple(Image.fromarray(t.permute(1, 2, 0).numpy()) for t in bundled_photos())


def _photos_fingerprint(photos: Sequence[Image.Image]) -> str:
    h = hashlib.sha256()
    for im in photos:
        h.update(repr(im.size).encode())
        h.update(im.tobytes())
    return h.hexdigest()[:16]


def make_photo_folders(
    root: str | Path, n_images: int, size: int = 256, classes: int = 10,
    domains: Sequence[str] = ("a", "b"), seed: int = 0, threads: int | None = None,
) -> Path:  # fmt: skip
    """Write ``n_images`` JPEGs of ``size`` px as ``root/<domain>/cNN/<domain>_NNNNNN.jpg`` and
    return ``root``. Class ``c`` is crops of photo ``c % photos``, turned by 90 degrees per round
    when there are more classes than photos; image ``i`` of a domain is of class ``i % classes``;
    the images are split evenly over ``domains`` (the first ones take the remainder), each domain
    in its own ``STYLES`` look. Every image comes from its own seeded generator, so the same
    parameters give the same bytes with any number of ``threads``.

    Idempotent: ``root/.bench-photos.json`` records the parameters, written last; a root with the
    same record is returned as it is, one with another record is rebuilt. The images are written
    under ``<root>.partial`` and moved to ``root`` when complete. A non-empty ``root`` without the
    record is refused (a DatasetError), never overwritten."""
    root = Path(root).expanduser()
    if n_images < len(domains) * classes or size < 8 or classes < 1 or not domains:
        raise DatasetError(
            f"make_photo_folders({root}): need size >= 8 and n_images >= classes x domains "
            f"({classes} x {len(domains)}), got n_images={n_images}, size={size}"
        )
    photos = source_photos()
    params = dict(version=GENERATOR_VERSION, n_images=n_images, size=size, classes=classes,
                  domains=list(domains), seed=seed, quality=JPEG_QUALITY,
                  photos=_photos_fingerprint(photos))  # fmt: skip
    if read_marker(root) == params:
        return root
    _clear(root)
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for d in domains:
        for c in range(classes):
            (partial / d / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
    _write_images(partial, params, photos, threads or default_threads())
    (partial / MARKER).write_text(json.dumps(params, indent=1))
    partial.rename(root)
    return root


def _write_images(
    out: Path, params: dict[str, Any], photos: Sequence[Image.Image], threads: int
) -> None:
    """Every image ``params`` asks for under ``out``, in chunks over ``threads`` threads."""
    domains, classes, size, seed = (params[k] for k in ("domains", "classes", "size", "seed"))
    shares = _shares(params["n_images"], len(domains))
    jobs = [
        (k, d, i)
        for k, (d, count) in enumerate(zip(domains, shares, strict=True))
        for i in range(count)
    ]

    def write(chunk: list[tuple[int, str, int]]) -> None:
        for k, d, i in chunk:
            im = render(photos, size, seed, k, i, i % classes)
            im.save(out / d / f"c{i % classes:02d}" / f"{d}_{i:06d}.jpg", quality=JPEG_QUALITY)

    step = max(1, len(jobs) // (threads * 8))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(write, [jobs[j : j + step] for j in range(0, len(jobs), step)]))


def read_marker(root: Path) -> dict[str, Any] | None:
    """The parameters recorded in ``root``'s marker, or None."""
    try:
        return json.loads((root / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _clear(root: Path) -> None:
    """Remove a generated ``root`` (it has the marker); refuse a folder that is not ours."""
    if not root.exists():
        return
    if (root / MARKER).is_file():
        shutil.rmtree(root)
    elif any(root.iterdir()):
        raise DatasetError(
            f"{root} holds files but no {MARKER}: not a generated dataset, so it is not "
            "overwritten; pick an empty or new folder"
        )
    else:
        root.rmdir()


def _shares(n: int, parts: int) -> list[int]:
    return [n // parts + (k < n % parts) for k in range(parts)]


_TURNS = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)


def render(
    photos: Sequence[Image.Image], size: int, seed: int, domain: int, i: int, label: int
) -> Image.Image:
    """Image ``i`` of domain number ``domain``: a seeded square crop (40-90 % of the photo's
    shorter side) of class ``label``'s photo, resized to ``size``, maybe mirrored, its brightness
    jittered, in the domain's style."""
    rng = np.random.default_rng([seed, domain, i])
    photo = photos[label % len(photos)]
    w, h = photo.size
    side = int(min(w, h) * rng.uniform(0.4, 0.9))
    left, top = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
    im = photo.resize(
        (size, size), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side)
    )
    turn = _TURNS[(label // len(photos)) % 4]
    if turn is not None:
        im = im.transpose(turn)
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _style(im, STYLES[domain % len(STYLES)], float(rng.uniform(0.85, 1.15)))


def _style(im: Image.Image, style: str, gain: float) -> Image.Image:
    """``im`` in a domain's look, its brightness times ``gain`` (rounded to 1 %)."""
    if style == "faded":  # 80 % grey, lower contrast, blurred
        im = Image.blend(im, im.convert("L").convert("RGB"), 0.8)
    im = im.point(_table(style, round(gain * 100)))
    return im.filter(ImageFilter.BoxBlur(1)) if style == "faded" else im


@lru_cache(maxsize=512)
def _table(style: str, percent: int) -> list[int]:
    """The lookup table of a style at a brightness of ``percent`` %, for ``Image.point``."""
    v = np.arange(256, dtype=np.float64) * (percent / 100)
    if style == "faded":
        lut = [128 + 0.7 * (v - 128)] * 3
    elif style == "tinted":  # warm cast, higher contrast
        lut = [128 + 1.25 * (v * g - 128) for g in (1.15, 1.0, 0.75)]
    else:
        lut = [v] * 3
    return np.concatenate(lut).round().clip(0, 255).astype(np.uint8).tolist()


def photo_files(root: Path) -> list[Path]:
    """Every generated image under ``root``, sorted."""
    return sorted(root.glob("*/c*/*.jpg"))


# ------------------------------------------------------------------------------- plain decoding


def plain_decode(path: Path, size: int) -> np.ndarray:
    """What a plain loader does with one file: PIL open, RGB, shorter side resized to ``size``
    (bilinear), the central square: uint8 ``(size, size, 3)``."""
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    w, h = rgb.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        rgb = rgb.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.asarray(rgb.crop((left, top, left + size, top + size)))


def plain_decode_rate(paths: Iterable[Path], size: int, threads: int | None = None) -> float:
    """Images per second of ``plain_decode`` over ``paths`` with a ``ThreadPoolExecutor`` of
    ``threads`` (default: this process's CPUs): the reference for a decoded-image cache build,
    which does the same work and also writes the pixels."""
    paths = list(paths)
    step = max(1, len(paths) // ((threads or default_threads()) * 8))

    def chunk(part: list[Path]) -> int:
        return sum(int(plain_decode(p, size)[0, 0, 0]) for p in part)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads or default_threads()) as pool:
        list(pool.map(chunk, [paths[k : k + step] for k in range(0, len(paths), step)]))
    return len(paths) / (time.perf_counter() - t0)


# ----------------------------------------------------------------------------- process memory

_STATUS_KEYS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def proc_status(pid: int) -> dict[str, int]:
    """``VmHWM`` (peak RSS), ``VmRSS``, ``RssAnon``, ``RssFile``, ``RssShmem`` of ``pid`` in kB
    from ``/proc/<pid>/status`` (empty once the process has exited).

    RSS counts every resident page a process maps: its own anonymous memory, and the touched pages
    of mapped files, which live in the page cache and are shared with every process mapping the
    file. Data read through a memory-mapped cache so shows in RSS (as ``RssFile``) while it is
    touched, yet holds no private memory: a run's own memory is ``RssAnon``, reported apart. ``Pss``
    (``smaps_rollup``, ``mapped_usage``) divides each shared page among the processes mapping it:
    two workers sharing one copy of a mapping each show about half its ``Rss`` as ``Pss``."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    fields = (line.partition(":") for line in text.splitlines())
    return {key: int(rest.split()[0]) for key, _, rest in fields if key in _STATUS_KEYS}


def _kb_fields(lines: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0])
    return out


def smaps_rollup(pid: int) -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup`` in kB (``Rss``, ``Pss``, ``Pss_Anon``, ``Pss_File``,
    ``Shared_Clean``, ``Private_Dirty``...) with ``USS`` added; empty once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    out = _kb_fields(text.splitlines()[1:])
    if out:
        out["USS"] = out.get("Private_Clean", 0) + out.get("Private_Dirty", 0)
    return out


_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def mapped_usage(pid: int, under: str | Path) -> dict[str, int]:
    """``Rss``, ``Pss``, ``Shared`` and ``Private`` (kB) of ``pid``'s mappings of files under
    ``under`` (the decoded-image cache), from ``/proc/<pid>/smaps``; zeros when none."""
    prefix = str(Path(under).resolve())
    totals = {"Rss": 0, "Pss": 0, "Shared": 0, "Private": 0, "mappings": 0}
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return totals
    inside = False
    for line in lines:
        if _MAPPING.match(line):
            parts = line.split(maxsplit=5)
            inside = len(parts) == 6 and parts[5].startswith(prefix)
            totals["mappings"] += inside
        elif inside and (f := _kb_fields([line])):
            key, value = next(iter(f.items()))
            if key in ("Rss", "Pss") or key.startswith(("Shared_", "Private_")):
                totals[key.split("_")[0]] += value
    return totals


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children...), from ``/proc/*/stat``."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        out += (kids := children.get(todo.pop(), []))
        todo += kids
    return sorted(out)


@dataclass
class ChildRun:
    """A finished child process: exit status, wall time, its output lines with their arrival time
    (seconds from the start), its own peak RSS from ``wait4`` (``max_rss_kb``: anonymous and file
    pages together), the highest ``proc_status`` values sampled (``peak``, kB; ``RssAnon`` is the
    figure to compare), and whatever ``sample`` returned at each look."""

    returncode: int
    wall_s: float
    lines: list[tuple[float, str]]
    max_rss_kb: int
    peak: dict[str, int] = field(default_factory=dict)
    samples: list[Any] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "\n".join(text for _, text in self.lines)


def run_child(
    argv: Sequence[str], env: dict[str, str] | None = None,
    sample: Callable[[int], Any] | None = None, interval_s: float = 0.1,
    timeout_s: float | None = None,
) -> ChildRun:  # fmt: skip
    """Run ``argv`` (unbuffered Python output, in its own session), looking at it every
    ``interval_s``; after ``timeout_s`` its whole process group is killed."""
    child_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=child_env, start_new_session=True,
    )  # fmt: skip
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append((time.perf_counter() - t0, line.rstrip("\n")))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    peak: dict[str, int] = {}
    samples: list[Any] = []
    while True:
        done, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if done:
            break
        for key, value in proc_status(proc.pid).items():
            peak[key] = max(peak.get(key, 0), value)
        if sample is not None:
            samples.append(sample(proc.pid))
        if timeout_s is not None and time.perf_counter() - t0 > timeout_s:
            os.killpg(proc.pid, 9)
        time.sleep(interval_s)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    reader.join(timeout=10)
    return ChildRun(proc.returncode, wall, lines, usage.ru_maxrss, peak, samples)


# --------------------------------------------------------------------------------- log reading

#: the line a run starts with (``harness.console.run_header``), printed just before the preflight,
#: whose first step builds the pair's domains: the data step starts here
HEADER = re.compile(r"study \S+: \d+ pair\(s\)")
#: the line after each trial (``harness.search.progress``): ``LABEL: trial N state value
#: [done/budget, best B, Ss]``, S the whole seconds since the search loop began
TRIAL_LINE = re.compile(r": trial (\d+) (\w+) .*\[(\d+)/(\d+), best \S+, (\d+)s\]\s*$")


def first_trial_timing(lines: Sequence[tuple[float, str]]) -> dict[str, float] | None:
    """Seconds from the run's header line to the start of its first trial's search loop (the
    first trial line's arrival less its elapsed seconds, so within 0.5 s), and the raw seconds
    from the header to that line (which, for the same trial, compares two runs exactly)."""
    start = next((t for t, text in lines if HEADER.search(text)), None)
    trial = next(((t, m) for t, text in lines if (m := TRIAL_LINE.search(text))), None)
    if start is None or trial is None:
        return None
    t, m = trial
    return {
        "header_to_first_trial_line_s": t - start,
        "data_to_first_trial_s": t - int(m.group(5)) - start,
        "resolution_s": 0.5,
    }


# ----------------------------------------------------------------------------------- the study


def write_study(
    path: str | Path, data_root: str | Path, image_size: int, *,
    domains: tuple[str, str] = ("a", "b"), trials: int = 1, epochs: int = 1,
    batch_size: int = 64, dataset_options: dict[str, Any] | None = None,
) -> Path:  # fmt: skip
    """A study over the generated folders: ``photos/<a> -> photos/<b>``, timm's ``test_resnet``
    without weights, a linear head, ``finetune``, fp32 (no precision probe), no augmentation and
    fixed learning rates, ``trials`` trials of ``epochs`` epochs, one final seed.
    ``dataset_options`` adds keys to the ``folder`` alias."""
    options = {"root": str(Path(data_root).resolve()), **(dataset_options or {})}
    alias = "\n".join(f"{k} = {json.dumps(v)}" for k, v in options.items())
    text = f"""description = "data path at scale: {image_size} px, {trials} trial(s)"
image_size = {image_size}
batch_size = {batch_size}
precision = "fp32"
final_seeds = 1
pairs = [{{ source = "photos/{domains[0]}", target = "photos/{domains[1]}" }}]
methods = [{{ backbone = "test_resnet", weights = "none", head = "linear", strategy = "finetune" }}]
budget = {{ trials = {trials}, max_epochs = {epochs} }}
search = {{ pruner = "none", backbone_lr = 1e-3, head_lr = 1e-2, weight_decay = 1e-4, augment = "none" }}

[datasets.photos]
plugin = "folder"
{alias}
"""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def harness_argv(*args: str) -> list[str]:
    """``python -m harness.cli ARGS`` with this interpreter (the ``harness`` script's entry)."""
    return [sys.executable, "-m", "harness.cli", *args]
