"""The decoded-image cache: a domain's image files decoded once, at the stored size, into one
uint8 file that every later run and every worker process maps read-only.

The file ``<cache>/decoded/<key>.u8`` holds ``(N, 3, H, W)`` pixels, one row per listed file (the
row of a file that cannot be read stays zero and is listed), and for segmentation
``<key>.mask.u8`` the ``(N, H, W)`` masks; ``<key>.json`` beside them says what they hold and is
written last, so a file without its description, or one whose size or format does not match it,
is never trusted: it is rebuilt with one line saying why. The key covers what decides
the pixels: the dataset plugin and its options, every file's path, size and modification time,
the stored size, the resize rule and the decoder's version. Both files are written under temporary
names and renamed when complete; a file lock makes two processes that need one domain decode it
once. A run keeps the mapping it opened even if the file is later replaced.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
from torch import Tensor

from harness.api.data import ImageFiles
from harness.data.decode import decode_failure, read_image
from harness.errors import CacheError, DatasetError, PluginContractError
from harness.fileio import cache_dir, write_json

#: bump when the file layout or the decoding changes, so that old files are rebuilt
FORMAT = "decoded-v1"
#: images decoded per block of work handed to the threads
BLOCK = 1024


Size = int | tuple[int, int]


@dataclass
class Decoded:
    """A domain's pixels in the cache, mapped: ``images`` ``(N, 3, H, W)`` uint8, one row per file
    of the listing (zeros where a file could not be read), ``masks`` ``(N, H, W)`` uint8 for
    segmentation, ``bad`` the files that could not be read with why, ``digest`` a hash of the
    readable rows."""

    images: Tensor
    masks: Tensor | None
    bad: dict[int, str]
    digest: str
    key: str
    path: Path
    built: bool


def hw(size: Size) -> tuple[int, int]:
    """``(height, width)`` of a stored size: a square's side, or ``(width, height)``."""
    return (size, size) if isinstance(size, int) else (int(size[1]), int(size[0]))


def mask_path(path: Path) -> Path:
    return path.with_suffix(".mask.u8")


def decoded_root() -> Path:
    return cache_dir() / "decoded"


def decode_threads() -> int:
    """Threads that decode (PIL releases the GIL while decoding and resizing)."""
    return max(2, min(16, (os.cpu_count() or 2) * 2))


def cache_key(files: ImageFiles, size: Size, plugin_key: str) -> str:
    """What decides the cached pixels: the dataset plugin and options (``plugin_key``), the files'
    paths, sizes and modification times, the stored size, the resize rule and the decoder."""
    h = hashlib.sha256()
    h.update(
        json.dumps(
            [FORMAT, PIL.__version__, size, files.resize, files.key, plugin_key, files.task]
        ).encode()
    )
    for path in files.paths:
        try:
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}\0missing\n".encode())
    return h.hexdigest()[:24]


def load_decoded(
    files: ImageFiles,
    size: Size,
    plugin_key: str = "",
    log: Callable[[str], None] = print,
    root: Path | None = None,
) -> Decoded:
    """The domain's decoded images, from the cache when it holds them, else decoded now (once,
    whichever process gets the lock first) and then mapped."""
    root = root or decoded_root()
    key = cache_key(files, size, plugin_key)
    path = root / f"{key}.u8"
    found = _open(files, size, key, path, lambda _: None)  # a broken one is said under the lock
    if found is not None:
        return found
    _writable(root)
    with _locked(root / f"{key}.lock", files.name, log):
        found = _open(files, size, key, path, log)  # built by another process meanwhile
        if found is not None:
            return found
        for orphan in root.glob(f".{key}.*.tmp"):  # a build killed without a chance to clean up
            orphan.unlink(missing_ok=True)
        bad, digest = _build(files, size, path, log)
        write_json(path.with_suffix(".json"), _description(files, size, bad, digest))
    found = _open(files, size, key, path, log)
    assert found is not None
    found.built = True
    return found


def _description(files: ImageFiles, size: Size, bad: dict[int, str], digest: str) -> dict:
    return {
        "format": FORMAT,
        "name": files.name,
        "n": len(files.paths),
        "shape": [3, *hw(size)],
        "masks": files.task == "segmentation",
        "bad": {str(i): why for i, why in bad.items()},
        "digest": digest,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _open(files: ImageFiles, size: Size, key: str, path: Path, log: Callable) -> Decoded | None:
    """The mapped cache files when they are complete and consistent; None when there are none
    (broken ones are announced, and will be rebuilt)."""
    meta_path = path.with_suffix(".json")
    if not meta_path.exists():
        return None
    shape = (len(files.paths), 3, *hw(size))
    masks = files.task == "segmentation"
    try:
        meta = json.loads(meta_path.read_text())
        problem = _problem(meta, path, shape, masks)
    except (OSError, ValueError, AttributeError) as exc:
        problem = f"unreadable ({type(exc).__name__})"
    if problem is not None:  # replaced when rebuilt; a run that maps the old files keeps them
        log(f"decoded-image cache {path} for {files.name} is unusable ({problem}); rebuilding it")
        return None
    images = np.memmap(path, dtype=np.uint8, mode="c", shape=shape)
    mask = None
    if masks:
        mask = np.memmap(mask_path(path), dtype=np.uint8, mode="c", shape=(shape[0], *shape[2:]))
    bad = {int(i): why for i, why in meta["bad"].items()}
    return Decoded(
        torch.from_numpy(images),
        None if mask is None else torch.from_numpy(mask),
        bad,
        meta["digest"],
        key,
        path,
        built=False,
    )


def _problem(meta: dict, path: Path, shape: tuple[int, ...], masks: bool) -> str | None:
    """Why described cache files cannot be trusted, or None."""
    if meta.get("format") != FORMAT:
        return f"format {meta.get('format')!r}, not {FORMAT!r}"
    if meta.get("n") != shape[0] or meta.get("shape") != list(shape[1:]):
        return "a different listing"
    expected = {path: int(np.prod(shape))}
    if masks:
        expected[mask_path(path)] = int(np.prod((shape[0], *shape[2:])))
    for file, size in expected.items():
        if file.stat().st_size != size:
            return f"{file.name} has {file.stat().st_size} bytes, not {size}"
    return None


def _writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=root).close()
    except OSError as exc:
        raise CacheError(
            f"decoded-image cache: cannot write to {root} ({exc.strerror or exc})",
            hint="make it writable or point HARNESS_CACHE_DIR at a writable directory",
        ) from None


@contextmanager
def _locked(lock_path: Path, name: str, log: Callable[[str], None]) -> Iterator[None]:
    """Hold ``lock_path`` exclusively; say so once when another process holds it."""
    with open(lock_path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process that is decoding {name} (lock {lock_path})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _space_error(root: Path, files: ImageFiles, need: int, size: Size) -> CacheError:
    free = shutil.disk_usage(root).free
    h, w = hw(size)
    return CacheError(
        f"decoded-image cache: {root} needs {need / 2**30:.2f} GiB for {files.name} "
        f"({len(files.paths)} images at {w}x{h} px), {free / 2**30:.2f} GiB free",
        hint="free space there or point HARNESS_CACHE_DIR at a larger disk",
    )


def _build(files: ImageFiles, size: Size, path: Path, log: Callable) -> tuple[dict[int, str], str]:
    """Decode every file into ``path`` (and the masks beside it), each written under a temporary
    name and renamed when complete; the files that could not be read, and the digest of the
    rest."""
    n, (h, w) = len(files.paths), hw(size)
    shapes = {path: (n, 3, h, w)}
    if files.task == "segmentation":
        shapes[mask_path(path)] = (n, h, w)
    need = sum(int(np.prod(s)) for s in shapes.values())
    if shutil.disk_usage(path.parent).free < need:
        raise _space_error(path.parent, files, need, size)
    with ExitStack() as stack:
        arrays = [stack.enter_context(_allocated(p, s, files, size)) for p, s in shapes.items()]
        bad, digests = _decode_all(
            files, (h, w), arrays[0], arrays[1] if len(arrays) > 1 else None, log
        )
    whole = hashlib.sha256(b"".join(d for d in digests if d is not None))
    return bad, whole.hexdigest()[:16]


@contextmanager
def _allocated(
    path: Path, shape: tuple[int, ...], files: ImageFiles, size: Size
) -> Iterator[np.ndarray]:
    """A writable map of a new file of ``shape`` bytes, all of it allocated up front (a full disk
    fails here, not as a fault while writing), renamed to ``path`` when the block succeeds."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.posix_fallocate(fd, 0, int(np.prod(shape)))
        except OSError:
            raise _space_error(path.parent, files, int(np.prod(shape)), size) from None
        array = np.memmap(tmp, dtype=np.uint8, mode="r+", shape=shape)
        yield array
        array.flush()
        del array
        os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _decode_all(
    files: ImageFiles,
    size: tuple[int, int],
    images: np.ndarray,
    masks: np.ndarray | None,
    log: Callable,
) -> tuple[dict[int, str], list[bytes | None]]:
    """Decode the files into the rows of ``images`` (and ``masks``) with threads; each row's
    digest (None for a file that could not be read)."""
    n = len(files.paths)
    read = functools.partial(_read, files, size)

    def decode(i: int) -> tuple[bytes | None, str | None]:
        pixels, mask, error = read(i)
        if pixels is None:
            return None, error
        images[i] = pixels.transpose(2, 0, 1)
        digest = hashlib.sha256(images[i].tobytes())
        if masks is not None:
            masks[i] = mask
            digest.update(masks[i].tobytes())
        return digest.digest(), None

    bad: dict[int, str] = {}
    digests: list[bytes | None] = []
    progress = Progress(f"decoding {files.name}", n, log)
    with ThreadPoolExecutor(max_workers=decode_threads()) as pool:
        for start in range(0, n, BLOCK):
            for i, (digest, error) in enumerate(
                pool.map(decode, range(start, min(n, start + BLOCK))), start
            ):
                digests.append(digest)
                if error is not None:
                    bad[i] = error
            progress.update(len(digests))
    progress.done()
    return bad, digests


def _read(
    files: ImageFiles, size: tuple[int, int], i: int
) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """File ``i`` at ``(height, width)``: its pixels, its mask (segmentation) and why it could not
    be read (None when it could); the dataset's ``decode`` where it has one."""
    h, w = size
    path = files.paths[i]
    if files.decode is None:
        pixels, error = read_image(path, image_size=(w, h), resize=files.resize)
        return pixels, None, error
    try:
        pixels, mask = files.decode(i, (h, w))
    except DatasetError as exc:  # the dataset's own words for what is wrong with the file
        return None, None, str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure makes the file unreadable
        return None, None, decode_failure(path, exc)
    pixels = np.asarray(pixels)
    if pixels.shape != (h, w, 3) or pixels.dtype != np.uint8:
        raise PluginContractError(
            f"domain {files.name!r}: decode({i}) returned a {pixels.dtype} image of "
            f"{pixels.shape}, not uint8 ({h}, {w}, 3)"
        )
    if files.task == "segmentation" and (mask is None or np.asarray(mask).shape != (h, w)):
        got = None if mask is None else np.asarray(mask).shape
        raise PluginContractError(
            f"domain {files.name!r}: decode({i}) returned a mask of {got}, not ({h}, {w})"
        )
    if mask is None:
        return pixels, None, None
    mask = np.asarray(mask)
    if mask.dtype != np.uint8 and mask.size and (mask.min() < 0 or mask.max() > 255):
        raise PluginContractError(
            f"domain {files.name!r}: decode({i}) returned mask values {mask.min()}..{mask.max()}; "
            "masks hold class indices 0..254 and 255 for void"
        )
    return pixels, mask.astype(np.uint8), None


class Progress:
    """A count with the time left, on one line: redrawn in a terminal, else a line every tenth."""

    def __init__(self, what: str, total: int, log: Callable[[str], None]) -> None:
        self.what, self.total, self.log = what, total, log
        self.start = time.monotonic()
        self.tty = log is print and os.isatty(2)
        self.next_tenth = 1

    def _line(self, done: int) -> str:
        elapsed = time.monotonic() - self.start
        left = elapsed / done * (self.total - done) if done else float("nan")
        rate = done / elapsed if elapsed > 0 else 0.0
        return f"{self.what}: {done}/{self.total} images, {rate:.0f}/s, {left:.0f} s left"

    def update(self, done: int) -> None:
        if self.tty:
            print("\r" + self._line(done), end="", flush=True, file=sys.stderr)
        elif done * 10 >= self.next_tenth * self.total and done < self.total:
            self.log(self._line(done))
            self.next_tenth = done * 10 // self.total + 1

    def done(self) -> None:
        elapsed = time.monotonic() - self.start
        if self.tty:
            print(file=sys.stderr)
        self.log(f"{self.what}: {self.total} images decoded in {elapsed:.1f} s")
