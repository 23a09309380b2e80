"""minikd's one reader and writer of files (floor 1): every ``.npz``, ``.npy`` and ``.json`` that
minikd reads goes through here, never with pickle, and a file that cannot be used is refused with
a ``FileError`` (a ``UserError``, so a ``ValueError``) that names the file and says in minikd's words what is wrong:
not there, a folder, empty, not a NumPy file (a text file given as ``.npz``), truncated or
corrupted, holding Python objects (pickled data, which minikd never loads), a missing key, a wrong
shape, non-finite values. NumPy's own messages are not passed on: for a text file it says the file
"contains pickled data" and suggests ``allow_pickle=True``, which is false and unsafe.

Writes are atomic (``atomic_write``: a temporary name, then a rename), so an interrupted or failed
write never leaves a half-written file in place of a good one; ``writable_dir`` proves a folder
can be written before any work is spent on what will go there.
"""
from __future__ import annotations

import json
import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .checks import UserError

__all__ = ["FileError", "read_npz", "read_npy", "read_array", "read_json", "require_keys", "check_finite_rows",
           "atomic_write", "write_npz", "write_npy", "writable_dir", "writable_file"]

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
NPY_MAGIC = b"\x93NUMPY"

# what a damaged file raises while NumPy or zipfile reads it
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError, KeyError, NotImplementedError)


class FileError(UserError):
    """A file minikd cannot use: the message names the file and what is wrong with it."""


def _existing_file(path, what) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileError(f"{path}: no such file ({what})")
    if path.is_dir():
        raise FileError(f"{path}: is a folder, expected a file ({what})")
    return path


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)


def _kind(path: Path, what: str) -> str:
    head = _head(path)
    if not head:
        raise FileError(f"{path}: the file is empty ({what})")
    if head.startswith(ZIP_MAGIC) or head.startswith(EMPTY_ZIP_MAGIC):
        return "npz"
    if head.startswith(NPY_MAGIC):
        return "npy"
    raise FileError(f"{path}: not a NumPy file (it starts with neither NumPy's .npy header nor a zip "
                    f"archive's; {what})")


_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _array(opener, path, name, size):
    """One array from ``opener()`` (a binary file object holding ``size`` bytes): its header is
    read first, so a damaged header that claims more data than the file holds is refused as
    corrupted instead of allocating it."""
    with opener() as f:
        try:
            version = np.lib.format.read_magic(f)
            header = _HEADER_READERS.get(version)
            if header is not None:
                shape, _, dtype = header(f)
                need = dtype.itemsize * int(np.prod(shape, dtype=np.float64)) if not dtype.hasobject else 0
                if need > size:
                    raise FileError(f"{path}: {name} is truncated or corrupted (its header promises {need} bytes, "
                                    f"the file holds {size})")
        except FileError:
            raise
        except _READ_ERRORS as exc:
            raise FileError(f"{path}: {name} has a damaged header ({type(exc).__name__}: {exc})") from None
    with opener() as f:
        return _read_array(f, path, name)


def _read_array(f, path, name):
    try:
        return np.lib.format.read_array(f, allow_pickle=False)
    except _READ_ERRORS as exc:
        if "allow_pickle" in str(exc):   # an object array: NumPy would unpickle it
            raise FileError(f"{path}: {name} holds Python objects (pickled data), which minikd never loads; "
                            f"save plain numeric arrays") from None
        raise FileError(f"{path}: {name} is truncated or corrupted ({type(exc).__name__}: {exc})") from None


def read_npz(path, what: str = "an .npz of arrays") -> dict:
    """All arrays of an ``.npz`` (every member read and checked now, not lazily): {name: array}."""
    path = _existing_file(path, what)
    kind = _kind(path, what)
    if kind != "npz":
        raise FileError(f"{path}: a single .npy array, expected an .npz archive of named arrays ({what})")
    out = {}
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                with z.open(info) as f:
                    if f.read(6) != NPY_MAGIC:
                        raise FileError(f"{path}: member {info.filename!r} is not a NumPy array")
                out[name] = _array(lambda info=info: z.open(info), path, f"array {name!r}", info.file_size)
    except FileError:
        raise
    except _READ_ERRORS as exc:
        raise FileError(f"{path}: truncated or not a valid .npz archive ({type(exc).__name__}: {exc})") from None
    return out


def read_npy(path, what: str = "a .npy array") -> np.ndarray:
    """The array of a ``.npy`` file."""
    path = _existing_file(path, what)
    if _kind(path, what) != "npy":
        raise FileError(f"{path}: an .npz archive, expected a single .npy array ({what})")
    return _array(lambda: open(path, "rb"), path, "the array", path.stat().st_size)


def read_array(path, key: str = "x", what: str = "an array") -> np.ndarray:
    """One array from a ``.npy``, or from an ``.npz`` (its array ``key``, or its only array)."""
    path = _existing_file(path, what)
    if _kind(path, what) == "npy":
        return read_npy(path, what)
    arrays = read_npz(path, what)
    if key in arrays:
        return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    raise FileError(f"{path}: expected a .npy, or an .npz with an array {key!r} (or a single array); "
                    f"found {sorted(arrays)}")


def read_json(path, what: str = "a JSON file"):
    path = _existing_file(path, what)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise FileError(f"{path}: not a text file ({what})") from None
    except json.JSONDecodeError as exc:
        raise FileError(f"{path}: not valid JSON ({exc}; {what})") from None
    except RecursionError:
        raise FileError(f"{path}: nested too deeply to be {what}") from None


def require_keys(mapping, keys, path, what: str):
    """Refuse a JSON object (or dict of arrays) without all of ``keys``."""
    if not isinstance(mapping, dict):
        raise FileError(f"{path}: expected {what} (a JSON object), got {type(mapping).__name__}")
    missing = [k for k in keys if k not in mapping]
    if missing:
        raise FileError(f"{path}: missing {', '.join(repr(k) for k in missing)} ({what})")


def check_finite_rows(a, name: str):
    """Refuse an array with NaN or +-inf, naming the first bad row (axis 0) and the value."""
    a = np.asarray(a)
    if a.dtype.kind not in "fc":
        return
    bad = ~np.isfinite(a)
    if bad.any():
        row = int(np.argmax(bad.reshape(len(a), -1).any(axis=1))) if a.ndim else 0
        value = a[row].flat[int(np.argmax(bad[row].ravel()))] if a.ndim else a[()]
        raise UserError(f"{name}: row {row} contains {value} (every value must be finite)")


# ---------------------------------------------------------------- writing

def atomic_write(path, write):
    """Call ``write(tmp_path)`` then rename onto ``path`` (atomic on POSIX): an interrupted or
    failed write leaves the old file (or none), never a half-written one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as exc:   # name the file the user asked for, not the temporary one
        reason = exc.strerror or f"{exc} (is the disk full?)"
        raise OSError(exc.errno, reason, str(path)) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def write_npz(path, arrays: dict):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    atomic_write(path, write)


def write_npy(path, array):
    """``array`` to exactly ``path`` (``np.save`` would append ``.npy`` to a name without it)."""
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, array)
    atomic_write(path, write)


def writable_dir(path, what: str) -> Path:
    """Create the folder ``path`` (and its parents) and prove it writable with a probe file, before
    any work is spent on what will be written there. Raises ``FileError`` naming ``what``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileError(f"{what} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".minikd-write-probe-{os.getpid()}"
        probe.write_bytes(b"minikd")
        probe.unlink()
    except OSError as exc:
        raise FileError(f"{what} {path}: cannot write there ({exc.strerror or exc})") from None
    return path


def writable_file(path, what: str) -> Path:
    """A file ``path`` minikd will write: not a folder, its folder created and writable."""
    path = Path(path)
    if path.is_dir():
        raise FileError(f"{what} {path}: is a folder, expected a file name")
    writable_dir(path.parent if str(path.parent) else Path("."), f"{what}'s folder")
    return path
