"""Beyond one machine (floor 4): soft targets as a chunked Zarr store, training that streams from
it, and sweeps as Dask tasks. Dask (``dask.distributed``) schedules; minikd only says what a task
is. Needs the optional extra: ``pip install "minikd[scale]"`` (dask[distributed] and zarr).

Where it runs (``dask_client``): by default on the machine itself, no cluster (the serial sweep;
a store written by Dask's local threads); ``workers=N`` starts a ``LocalCluster`` of N worker
processes (one thread each), ``scheduler="tcp://host:port"`` connects to a running
``dask scheduler``. A sweep's students and a store's chunks are pure functions of their inputs
and seeds: a task rerun on another worker (Dask reschedules the tasks of a worker that died)
gives the same bits.

The soft-target store (``write_store``, ``SoftTargetStore``), a Zarr v3 group::

    x          (N, D) float32   the transfer rows' inputs, standardized as the teacher's data
    logits     (N, C) float32   dense: the teacher's logits (the temperature is applied at loss time)
    indices    (N, k) int32     top-k: the k most probable classes of each row, most probable first
    values     (N, k) float32   top-k: their log-probabilities at T_gen (``mk.topk_from_dense``)
    tail_mass  (N,)   float32   top-k: 1 - sum(exp(values)), the mass off the k classes

chunked by rows (``chunk_rows``, zstd-compressed), with attributes under ``"minikd"``: the format,
the kind, k, T_gen, the dataset's spec and fingerprint, the teacher's fingerprint, how the
transfer rows were made, and ``complete``. Each chunk is one ``dask.array`` block: its task makes
(or receives) its rows' inputs, runs the exported teacher on them and writes exactly its chunk of
every array (no two tasks write one chunk, so no locks), so no process holds more than a chunk.
The group is written under a temporary name beside ``out`` and renamed onto it when every chunk is
written and ``complete`` is set: an interrupted or failed write leaves no store at ``out`` (only a
dot-named temporary folder), and a reader refuses a group without ``complete``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from . import checks
from .checks import MissingDependency, UserError
from .data import TRANSFER_BLOCK_ROWS, fingerprint, mnist1d_transfer_rows, standardize
from .files import FileError, check_finite_rows

__all__ = ["INSTALL", "ScaleError", "require", "dask_client", "run_tasks", "write_store", "SoftTargetStore",
           "teacher_fingerprint", "dataset_fingerprint", "is_store", "STORE_FORMAT", "CHUNK_ROWS"]

INSTALL = 'pip install "minikd[scale]"  (dask[distributed] and zarr)'
STORE_FORMAT = "minikd.soft_targets/1"
CHUNK_ROWS = 10_000          # rows per chunk: about 2 MB of inputs and logits, ten generator blocks
CONNECT_TIMEOUT = "15s"      # how long to try a scheduler's address before giving up


class ScaleError(UserError):
    """The cluster failed the job (a worker lost too often, the scheduler unreachable): one line."""


def require():
    """(dask, distributed, zarr), or ``MissingDependency`` saying what to install."""
    try:
        import dask  # noqa: PLC0415
        import dask.array  # noqa: F401, PLC0415
        import distributed  # noqa: PLC0415
        import zarr  # noqa: PLC0415
    except ImportError as exc:
        raise MissingDependency(f"Dask and Zarr are not installed ({exc.name} is missing); {INSTALL}") from None
    return dask, distributed, zarr


def is_store(path) -> bool:
    """Whether ``path`` names a Zarr store (ends in .zarr)."""
    return str(path).rstrip("/\\").endswith(".zarr")


# ---------------------------------------------------------------- where it runs

@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int = 0):
    """A ``distributed.Client`` for the job, or None (run on this machine, no cluster).

    ``scheduler``: the address of a running ``dask scheduler`` (tcp://host:port); ``workers``: the
    number of worker processes of a ``LocalCluster`` started (and closed) here, one thread each
    (minikd's NumPy work is single-threaded per task; processes sidestep the GIL)."""
    if scheduler and workers:
        raise UserError("workers: --workers starts a local cluster; --scheduler connects to one: give one of them")
    if not scheduler and not workers:
        yield None
        return
    _, distributed, _ = require()
    cluster = None
    try:
        if scheduler:
            client = distributed.Client(scheduler, timeout=CONNECT_TIMEOUT)
        else:
            cluster = distributed.LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                                               dashboard_address=None, silence_logs=logging.ERROR)
            client = distributed.Client(cluster)
    except (OSError, TimeoutError) as exc:
        if cluster is not None:
            cluster.close()
        where = f"scheduler {scheduler}" if scheduler else f"a local cluster of {workers} workers"
        raise ScaleError(f"{where}: cannot connect ({' '.join(str(exc).split()) or type(exc).__name__})") from None
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def _cluster_error(exc, what) -> Exception:
    """A cluster's failure as one line; minikd's own errors (a user's mistake) pass unchanged."""
    if isinstance(exc, (UserError, MissingDependency, MemoryError)):
        return exc
    name = type(exc).__name__
    if name in ("KilledWorker", "CommClosedError", "FutureCancelledError", "CancelledError", "TimeoutError") \
            or isinstance(exc, OSError):
        return ScaleError(f"{what}: the cluster failed ({name}: {' '.join(str(exc).split())[:300]})")
    return exc


def run_tasks(client, fn, calls, shared: dict, desc: str, progress: bool = True) -> list:
    """``fn(*args, **kwargs, **shared)`` for each ``(args, kwargs)`` of ``calls``, each a Dask task
    of ``client``; the results in the order of ``calls`` (not of completion). ``shared`` values
    (data sets, logits) go to every worker once (scattered, so a restarted worker fetches them
    from a peer). Progress: a bar that moves as tasks finish, in any order."""
    _, distributed, _ = require()
    keys = [k for k, v in shared.items() if v is not None]
    scattered = client.scatter([shared[k] for k in keys], broadcast=True, hash=False) if keys else []
    common = {**shared, **dict(zip(keys, scattered))}
    futures = [client.submit(fn, *args, **kwargs, **common, pure=False) for args, kwargs in calls]
    try:
        for f in tqdm(distributed.as_completed(futures), total=len(futures), desc=desc, disable=not progress,
                      unit="task"):
            f.result()   # the first failure stops the job now, not after the others
        return [f.result() for f in futures]
    except BaseException as exc:
        client.cancel(futures)
        error = _cluster_error(exc, desc)
        if error is exc:
            raise
        raise error from None


# ---------------------------------------------------------------- fingerprints

def teacher_fingerprint(teacher) -> str:
    """A content hash of a model's parameters and buffers (the store's teacher attribute)."""
    from .nn import state_dict  # noqa: PLC0415
    weights = state_dict(teacher)
    return fingerprint(*(weights[k] for k in sorted(weights)), np.frombuffer(" ".join(sorted(weights)).encode(),
                                                                              np.uint8))


def dataset_fingerprint(data) -> str:
    """A content hash of a dataset's labeled splits and standardization (not its transfer set)."""
    return fingerprint(data.x_train, data.y_train, data.x_val, data.y_val, data.x_test, data.y_test, data.mean,
                       data.std)


# ---------------------------------------------------------------- writing a store

def _write_chunk(block, *, path, teacher, mean, std, seed, top_k, T_gen, block_info=None):
    """One ``map_blocks`` task: the chunk's inputs (``block``: standardized inputs (rows, D), or the
    rows' indices to generate them from the block-generated MNIST-1D transfer set of ``seed``), the
    teacher's logits on them, written to the chunk's rows of every array of the group at
    ``path``. Returns the number of rows written (the block of a small array of counts)."""
    import zarr  # noqa: PLC0415
    start, stop = block_info[0]["array-location"][0]
    if block.ndim == 1:   # generate the rows, standardized as the teacher's data
        x = standardize(mnist1d_transfer_rows(seed, start, stop), mean, std)
        check_finite_rows(x, f"transfer rows {start}:{stop} after standardization")
    else:                 # the dataset's own transfer rows, already standardized
        x = np.asarray(block, dtype=np.float32)
    logits = np.asarray(teacher.predict(x), dtype=np.float32)
    check_finite_rows(logits, f"the teacher's logits on transfer rows {start}:{stop}")
    group = zarr.open_group(path, mode="r+")
    group["x"][start:stop] = x
    if top_k is None:
        group["logits"][start:stop] = logits
    else:
        from .losses.topk import topk_from_dense  # noqa: PLC0415
        indices, values = topk_from_dense(logits, top_k, T_gen)
        v = values.astype(np.float64)
        top = np.max(v, axis=-1, keepdims=True)
        mass = np.exp(top[:, 0]) * np.sum(np.exp(v - top), axis=-1)     # sum of the k probabilities
        group["indices"][start:stop] = indices.astype(np.int32)
        group["values"][start:stop] = values
        group["tail_mass"][start:stop] = np.clip(1.0 - mass, 0.0, 1.0).astype(np.float32)
    return np.array([stop - start], dtype=np.int64)


def _replace_dir(tmp: Path, out: Path):
    """Rename the finished ``tmp`` onto ``out`` (a store there before is replaced; between the two
    renames there is no store at ``out``, never a mixed one)."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_store(teacher, data, out, *, rows: int | None = None, top_k: int | None = None, T_gen: float = 1.0,
                chunk_rows: int = CHUNK_ROWS, client=None, progress: bool = True, transfer_seed: int | None = None):
    """Write the soft-target store ``out`` (a folder ending in .zarr; the module doc has its
    layout): the teacher's logits (dense, or its ``top_k`` classes) on a transfer set, by
    ``dask.array`` map_blocks over row chunks on ``client`` (None: Dask's local threads).

    The transfer rows: ``rows`` rows of the block-generated MNIST-1D transfer set
    (``minikd.data.mnist1d_transfer_rows`` of ``transfer_seed``, by default the dataset's seed)
    for an MNIST-1D dataset; for a dataset from an .npz its ``x_transfer`` (the first ``rows``).
    Returns the attributes written. Raises ``ScaleError`` (and leaves no store) when the cluster
    fails the job."""
    dask, _, zarr = require()
    import dask.array as da  # noqa: PLC0415
    out = Path(out)
    chunk_rows = checks.integer("chunk_rows", chunk_rows, 1, 10_000_000)
    classes, features = data.num_classes, data.x_train.shape[1]
    if top_k is not None:
        top_k = checks.integer("top_k", top_k, 1, classes)
    mnist = data.spec.get("kind") == "mnist1d"
    seed = int(data.spec.get("seed", 0) if transfer_seed is None else transfer_seed)
    if mnist:
        rows = checks.integer("rows", rows, 1, 100_000_000)
        inputs = da.arange(rows, chunks=chunk_rows)
        transfer = {"kind": "mnist1d_blocks", "seed": seed, "block_rows": TRANSFER_BLOCK_ROWS}
    else:
        x_transfer = data.x_transfer   # the user's file's, standardized
        rows = len(x_transfer) if rows is None else min(checks.integer("rows", rows, 1), len(x_transfer))
        if not rows:
            raise UserError(f"{data.spec.get('path', data.name)}: the data file has no x_transfer rows to label")
        inputs = da.from_array(x_transfer[:rows], chunks=(chunk_rows, features))
        transfer = {"kind": "npz_x_transfer", "path": data.spec.get("path"), "rows": rows}
    attrs = {"format": STORE_FORMAT, "kind": "dense" if top_k is None else "topk", "rows": rows,
             "chunk_rows": chunk_rows, "classes": classes, "features": features, "dataset": data.spec,
             "dataset_fingerprint": dataset_fingerprint(data), "teacher_fingerprint": teacher_fingerprint(teacher),
             "transfer": transfer, "complete": False}
    if top_k is not None:
        attrs.update(k=top_k, T_gen=float(T_gen))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        group = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        arrays = {"x": ((rows, features), "float32")}
        if top_k is None:
            arrays["logits"] = ((rows, classes), "float32")
        else:
            arrays.update(indices=((rows, top_k), "int32"), values=((rows, top_k), "float32"),
                          tail_mass=((rows,), "float32"))
        for name, (shape, dtype) in arrays.items():
            group.create_array(name, shape=shape, chunks=(chunk_rows, *shape[1:]), dtype=dtype)
        group.attrs["minikd"] = attrs
        counts = inputs.map_blocks(_write_chunk, path=str(tmp), teacher=teacher, mean=data.mean, std=data.std,
                                   seed=seed, top_k=top_k, T_gen=T_gen, chunks=((1,) * inputs.numblocks[0],),
                                   drop_axis=list(range(1, inputs.ndim)), dtype=np.int64,
                                   name=f"minikd-soft-targets-{uuid.uuid4().hex[:8]}")
        parts = counts.to_delayed().ravel().tolist()
        written = 0
        bar = tqdm(total=rows, desc="soft targets", disable=not progress, unit="row", unit_scale=True)
        with bar:
            if client is None:
                for part in parts:   # Dask's local scheduler, a chunk at a time in this process's threads
                    n = int(dask.compute(part, scheduler="threads")[0][0])
                    written += n
                    bar.update(n)
            else:
                futures = client.compute(parts)
                try:
                    for f in _as_completed(futures):
                        n = int(f.result()[0])
                        written += n
                        bar.update(n)
                except BaseException:
                    client.cancel(futures)
                    raise
        if written != rows:
            raise ScaleError(f"{out}: wrote {written} of {rows} rows")
        attrs["complete"] = True
        zarr.open_group(str(tmp), mode="r+").attrs["minikd"] = attrs   # last: marks every chunk written
        _replace_dir(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        error = _cluster_error(exc, f"soft targets {out}")
        if error is exc:
            raise
        raise error from None
    return attrs


def _as_completed(futures):
    from distributed import as_completed  # noqa: PLC0415
    return as_completed(futures)


# ---------------------------------------------------------------- reading a store

class SoftTargetStore:
    """A complete soft-target store, read a chunk at a time (``minikd.distill.TransferChunks``'s
    interface: ``rows``, ``chunk_rows``, ``num_chunks``, ``chunk(c)`` -> (inputs, teacher logits)).

    Opening checks the format, the ``complete`` marker and the arrays' shapes and chunks; a store
    that is not whole (an interrupted write, a damaged folder) is refused with a ``FileError``.
    ``chunk(c)`` reads only rows ``c * chunk_rows`` up to the next chunk of each array. A top-k
    store gives ``minikd.TopK`` teachers (log-probabilities at T_gen, variant ``variant``)."""

    def __init__(self, path, variant: str = "tail"):
        _, _, zarr = require()
        self.path = Path(path)
        if not self.path.is_dir():
            raise FileError(f"{self.path}: no soft-target store there"
                            + (" (it is a file)" if self.path.exists() else ""))
        try:
            group = zarr.open_group(str(self.path), mode="r")
            attrs = dict(group.attrs.get("minikd") or {})
        except Exception as exc:   # zarr's errors for a folder that is not a group vary by version
            raise FileError(f"{self.path}: not a Zarr group ({type(exc).__name__}: {exc})") from None
        if attrs.get("format") != STORE_FORMAT:
            raise FileError(f"{self.path}: not a minikd soft-target store (no {STORE_FORMAT!r} attributes)")
        if attrs.get("complete") is not True:
            raise FileError(f"{self.path}: an incomplete soft-target store (its write did not finish); write it again")
        self.attrs, self.kind, self.variant = attrs, attrs.get("kind"), variant
        self.rows, self.chunk_rows = int(attrs["rows"]), int(attrs["chunk_rows"])
        names = ("x", "logits") if self.kind == "dense" else ("x", "indices", "values", "tail_mass")
        try:
            self.arrays = {n: group[n] for n in names}
        except KeyError as exc:
            raise FileError(f"{self.path}: missing array {exc} (a damaged soft-target store)") from None
        width = {"x": attrs["features"], "logits": attrs["classes"], "indices": attrs.get("k"),
                 "values": attrs.get("k"), "tail_mass": None}
        for n, a in self.arrays.items():
            shape = (self.rows,) + (() if width[n] is None else (width[n],))
            if tuple(a.shape) != shape or a.chunks[0] != self.chunk_rows:
                raise FileError(f"{self.path}: array {n} has shape {a.shape} and chunks {a.chunks}, expected {shape} "
                                f"in chunks of {self.chunk_rows} rows (a damaged soft-target store)")
        self.num_chunks = -(-self.rows // self.chunk_rows)

    def read(self, name, c: int):
        """Rows of chunk ``c`` of array ``name`` (one chunk read from disk)."""
        start = c * self.chunk_rows
        return self.arrays[name][start:start + self.chunk_rows]

    def chunk(self, c: int):
        if not 0 <= c < self.num_chunks:
            raise IndexError(f"chunk {c}: the store has {self.num_chunks}")
        x = self.read("x", c)
        if self.kind == "dense":
            return x, self.read("logits", c)
        from .losses.topk import TopK  # noqa: PLC0415
        return x, TopK(self.read("indices", c).astype(np.int64), self.read("values", c),
                       T_gen=self.attrs["T_gen"], variant=self.variant)

    def check_matches(self, teacher, data):
        """Refuse a store written by another teacher or for another dataset (``FileError``)."""
        if self.attrs.get("teacher_fingerprint") != teacher_fingerprint(teacher):
            raise FileError(f"{self.path}: written by another teacher (fingerprint "
                            f"{self.attrs.get('teacher_fingerprint')}, this teacher's is {teacher_fingerprint(teacher)})")
        if self.attrs.get("dataset_fingerprint") != dataset_fingerprint(data):
            raise FileError(f"{self.path}: written for another dataset (fingerprint "
                            f"{self.attrs.get('dataset_fingerprint')}, the teacher's is {dataset_fingerprint(data)})")
        if self.attrs.get("classes") != data.num_classes or self.attrs.get("features") != data.x_train.shape[1]:
            raise FileError(f"{self.path}: {self.attrs.get('classes')} classes and {self.attrs.get('features')} "
                            f"features, the dataset has {data.num_classes} and {data.x_train.shape[1]}")
