"""The decoded-image cache: a domain's image files decoded once, at the stored size, into one
uint8 file that every later run and every worker process maps read-only.

The file ``<cache>/decoded/<key>.u8`` holds ``(N, 3, S, S)`` pixels, one row per listed file (the
row of a file that cannot be read stays zero and is listed); ``<key>.json`` beside it says what it
holds and is written last, so a file without its description, or one whose size or format does not
match it, is never trusted: it is rebuilt with one line saying why. The key covers what decides
the pixels: the dataset plugin and its options, every file's path, size and modification time,
the stored size, the resize rule and the decoder's version. Both files are written under temporary
names and renamed when complete; a file lock makes two processes that need one domain decode it
once. A run keeps the mapping it opened even if the file is later replaced.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
from torch import Tensor

from harness.api.data import ImageFiles
from harness.data.decode import read_image
from harness.errors import CacheError
from harness.fileio import cache_dir, write_json

#: bump when the file layout or the decoding changes, so that old files are rebuilt
FORMAT = "decoded-v1"
#: images decoded per block of work handed to the threads
BLOCK = 1024


@dataclass
class Decoded:
    """A domain's pixels in the cache, mapped: ``images`` ``(N, 3, S, S)`` uint8, one row per file
    of the listing (zeros where a file could not be read), ``bad`` the files that could not be
    read with why, ``digest`` a hash of the readable rows' pixels."""

    images: Tensor
    bad: dict[int, str]
    digest: str
    key: str
    path: Path
    built: bool


def decoded_root() -> Path:
    return cache_dir() / "decoded"


def decode_threads() -> int:
    """Threads that decode (PIL releases the GIL while decoding and resizing)."""
    return max(2, min(16, (os.cpu_count() or 2) * 2))


def cache_key(files: ImageFiles, size: int, plugin_key: str) -> str:
    """What decides the cached pixels: the dataset plugin and options (``plugin_key``), the files'
    paths, sizes and modification times, the stored size, the resize rule and the decoder."""
    h = hashlib.sha256()
    h.update(
        json.dumps([FORMAT, PIL.__version__, size, files.resize, files.key, plugin_key]).encode()
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
    size: int,
    plugin_key: str = "",
    log: Callable[[str], None] = print,
    root: Path | None = None,
) -> Decoded:
    """The domain's decoded images, from the cache when it holds them, else decoded now (once,
    whichever process gets the lock first) and then mapped."""
    root = root or decoded_root()
    key = cache_key(files, size, plugin_key)
    path = root / f"{key}.u8"
    found = _open(files, size, key, path, log)
    if found is not None:
        return found
    _writable(root)
    with _locked(root / f"{key}.lock", files.name, log):
        found = _open(files, size, key, path, log)  # built by another process meanwhile
        if found is not None:
            return found
        bad, digest = _build(files, size, path, log)
        write_json(path.with_suffix(".json"), _description(files, size, bad, digest))
    found = _open(files, size, key, path, log)
    assert found is not None
    found.built = True
    return found


def _description(files: ImageFiles, size: int, bad: dict[int, str], digest: str) -> dict:
    return {
        "format": FORMAT,
        "name": files.name,
        "n": len(files.paths),
        "shape": [3, size, size],
        "bad": {str(i): why for i, why in bad.items()},
        "digest": digest,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _open(files: ImageFiles, size: int, key: str, path: Path, log: Callable) -> Decoded | None:
    """The mapped cache file when it is complete and consistent; None when there is none (a
    broken one is announced, and will be rebuilt)."""
    meta_path = path.with_suffix(".json")
    if not meta_path.exists():
        return None
    shape = (len(files.paths), 3, size, size)
    try:
        meta = json.loads(meta_path.read_text())
        problem = (
            f"format {meta.get('format')!r}, not {FORMAT!r}"
            if meta.get("format") != FORMAT
            else "a different listing"
            if meta.get("n") != shape[0] or meta.get("shape") != list(shape[1:])
            else f"{path.stat().st_size} bytes, not {int(np.prod(shape))}"
            if path.stat().st_size != int(np.prod(shape))
            else None
        )
    except (OSError, ValueError, AttributeError) as exc:
        problem = f"unreadable ({type(exc).__name__})"
    if problem is not None:
        log(f"decoded-image cache {path} for {files.name} is unusable ({problem}); rebuilding it")
        meta_path.unlink(missing_ok=True)
        return None
    array = np.memmap(path, dtype=np.uint8, mode="c", shape=shape)
    bad = {int(i): why for i, why in meta["bad"].items()}
    return Decoded(torch.from_numpy(array), bad, meta["digest"], key, path, built=False)


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


def _space_error(root: Path, files: ImageFiles, need: int, size: int) -> CacheError:
    free = shutil.disk_usage(root).free
    return CacheError(
        f"decoded-image cache: {root} needs {need / 2**30:.2f} GiB for {files.name} "
        f"({len(files.paths)} images at {size} px), {free / 2**30:.2f} GiB free",
        hint="free space there or point HARNESS_CACHE_DIR at a larger disk",
    )


def _build(files: ImageFiles, size: int, path: Path, log: Callable) -> tuple[dict[int, str], str]:
    """Decode every file into ``path`` (written under a temporary name, renamed when complete);
    the files that could not be read, and the digest of the rest."""
    n, row = len(files.paths), 3 * size * size
    need = n * row
    if shutil.disk_usage(path.parent).free < need:
        raise _space_error(path.parent, files, need, size)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.posix_fallocate(fd, 0, need)  # a full disk fails here, not as a fault while writing
        except OSError:
            raise _space_error(path.parent, files, need, size) from None
        array = np.memmap(tmp, dtype=np.uint8, mode="r+", shape=(n, 3, size, size))
        bad, digests = _decode_all(files, size, array, log)
        array.flush()
        del array
        os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    whole = hashlib.sha256(b"".join(d for d in digests if d is not None))
    return bad, whole.hexdigest()[:16]


def _decode_all(
    files: ImageFiles, size: int, array: np.ndarray, log: Callable
) -> tuple[dict[int, str], list[bytes | None]]:
    """Decode the files into ``array``'s rows with threads; each row's digest (None if bad)."""
    n = len(files.paths)

    def decode(i: int) -> tuple[bytes | None, str | None]:
        pixels, error = read_image(files.paths[i], image_size=size, resize=files.resize)
        if pixels is None:
            return None, error
        array[i] = pixels.transpose(2, 0, 1)
        return hashlib.sha256(array[i].tobytes()).digest(), None

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
