"""minikd.scale: the soft-target store (Zarr, written by dask.array), training streamed from it, and
sweeps as Dask tasks, on a real LocalCluster of two worker processes, with a worker killed in the
middle of a sweep and of a store write. Tiny configs: the whole file runs in well under a minute
on two cores. Skipped without the extra (pip install "minikd[scale]")."""
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
zarr = pytest.importorskip("zarr")
import cloudpickle  # noqa: E402  (installed with distributed)

import minikd as mk  # noqa: E402
from minikd import experiments, scale  # noqa: E402
from minikd.cli import main  # noqa: E402
from minikd.data import mnist1d_transfer_rows, standardize  # noqa: E402
from minikd.distill import TrainConfig, TransferChunks, load_student, train_student  # noqa: E402
from minikd.experiments import SweepConfig, TeacherConfig, run_sweep, run_teacher  # noqa: E402

# the fault-injecting hooks below run in the workers: ship them by value (tests/ is not importable there)
cloudpickle.register_pickle_by_value(sys.modules[__name__])



def kill_this_worker_once(marker, test_pid):
    """SIGKILL the calling process, if it is a worker (not the test's, ``test_pid``) and ``marker``
    does not exist yet: exactly one worker dies, in the middle of its task."""
    if os.getpid() == test_pid:
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)


class KillOnStep:
    def __init__(self, marker):
        self.marker, self.test_pid = str(marker), os.getpid()

    def __call__(self, step):
        kill_this_worker_once(self.marker, self.test_pid)


class FaultyTeacher:
    """The teacher, with a fault in ``predict``: "kill" kills the first worker to call it, "raise"
    fails on the rows of chunk ``at``."""

    def __init__(self, model, fault, marker=None, at=0):
        self.model, self.fault, self.marker, self.at, self.test_pid = model, fault, str(marker), at, os.getpid()

    def __getattr__(self, name):   # state(), names, ...: the model's
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def predict(self, x):
        if self.fault == "kill":
            kill_this_worker_once(self.marker, self.test_pid)
        elif self.fault == "raise" and self.at == 0:
            raise RuntimeError("the teacher failed on this chunk")
        return self.model.predict(x)


@pytest.fixture(scope="module")
def cluster():
    """A real local cluster: two worker processes (one thread each), as the issue asks."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as c, distributed.Client(c) as client:
        yield client


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    run_teacher(TeacherConfig(samples=400, teacher_epochs=1, teacher_width=4, out=str(out), cache_dir=None,
                              progress=False))
    return out


def _teacher(teacher_dir):
    return experiments._exported_teacher(teacher_dir, 0)


def _arrays(path):
    g = zarr.open_group(str(path), mode="r")
    return {k: np.asarray(v[:]) for k, v in g.arrays()}


def _leftovers(folder):
    return sorted(p.name for p in Path(folder).iterdir() if ".tmp-" in p.name or ".old-" in p.name)


# ---------------------------------------------------------------- the store

def test_store_holds_the_teachers_logits_on_the_transfer_rows(teacher_dir, tmp_path):
    teacher, data = _teacher(teacher_dir)
    attrs = scale.write_store(teacher, data, tmp_path / "d.zarr", rows=1100, chunk_rows=400, progress=False)
    scale.write_store(teacher, data, tmp_path / "k.zarr", rows=1100, chunk_rows=400, top_k=3, progress=False)
    x = standardize(mnist1d_transfer_rows(0, 0, 1100), data.mean, data.std)
    d, k = _arrays(tmp_path / "d.zarr"), _arrays(tmp_path / "k.zarr")
    assert np.array_equal(d["x"], x) and np.array_equal(k["x"], x)
    logits = teacher.predict(x).astype(np.float32)
    np.testing.assert_allclose(d["logits"], logits, rtol=1e-6, atol=1e-6)
    idx, values = mk.topk_from_dense(d["logits"], 3)
    assert np.array_equal(k["indices"], idx) and np.array_equal(k["values"], values)
    np.testing.assert_allclose(k["tail_mass"], 1 - np.exp(values.astype(np.float64)).sum(-1), atol=1e-6)
    assert attrs["complete"] and attrs["teacher_fingerprint"] == scale.teacher_fingerprint(teacher)
    assert attrs["dataset_fingerprint"] == scale.dataset_fingerprint(data) and attrs["dataset"] == data.spec
    g = zarr.open_group(str(tmp_path / "d.zarr"), mode="r")
    assert g["logits"].chunks == (400, 10) and g["logits"].compressors   # row chunks, compressed
    assert _leftovers(tmp_path) == []


def test_store_written_on_the_cluster_equals_the_local_one_and_survives_a_killed_worker(cluster, teacher_dir,
                                                                                       tmp_path):
    teacher, data = _teacher(teacher_dir)
    scale.write_store(teacher, data, tmp_path / "local.zarr", rows=1500, chunk_rows=300, progress=False)
    killer = FaultyTeacher(teacher, "kill", tmp_path / "killed")
    before = set(cluster.scheduler_info()["workers"])
    scale.write_store(killer, data, tmp_path / "cluster.zarr", rows=1500, chunk_rows=300, client=cluster,
                      progress=False)
    assert (tmp_path / "killed").exists()   # a worker did die mid-write (the nanny started a new one)
    assert before - set(cluster.scheduler_info()["workers"])
    local, remote = _arrays(tmp_path / "local.zarr"), _arrays(tmp_path / "cluster.zarr")
    assert all(np.array_equal(local[k], remote[k]) for k in local)
    assert scale.SoftTargetStore(tmp_path / "cluster.zarr").attrs["complete"]
    assert _leftovers(tmp_path) == []


def test_a_failed_store_write_leaves_nothing_and_keeps_the_old_store(cluster, teacher_dir, tmp_path):
    teacher, data = _teacher(teacher_dir)
    out = tmp_path / "st.zarr"
    for client in (None, cluster):
        with pytest.raises(RuntimeError, match="teacher failed"):
            scale.write_store(FaultyTeacher(teacher, "raise"), data, out, rows=600, chunk_rows=200, client=client,
                              progress=False)
        assert not out.exists() and _leftovers(tmp_path) == []
    scale.write_store(teacher, data, out, rows=600, chunk_rows=200, progress=False)
    old = _arrays(out)
    with pytest.raises(RuntimeError):
        scale.write_store(FaultyTeacher(teacher, "raise"), data, out, rows=900, chunk_rows=200, progress=False)
    assert scale.SoftTargetStore(out).rows == 600 and np.array_equal(_arrays(out)["logits"], old["logits"])
    assert _leftovers(tmp_path) == []


def test_a_store_of_a_teacher_of_your_npz_holds_its_x_transfer(tmp_path):
    r = np.random.default_rng(0)
    y = np.arange(120) % 3
    x = r.standard_normal((120, 8)) + y[:, None]
    np.savez(tmp_path / "d.npz", x=x, y=y, x_transfer=r.standard_normal((250, 8)))
    experiments.run_distill(experiments.DistillConfig(data=str(tmp_path / "d.npz"), transfer_samples=0, epochs=1,
                                                      teacher_epochs=1, teacher_width=2, student_hidden=4,
                                                      out=str(tmp_path / "t"), cache_dir=None, progress=False))
    teacher, data = _teacher(tmp_path / "t")
    scale.write_store(teacher, data, tmp_path / "st.zarr", chunk_rows=100, progress=False)
    a = _arrays(tmp_path / "st.zarr")
    assert np.array_equal(a["x"], data.x_transfer) and len(a["x"]) == 250
    assert np.array_equal(a["logits"], teacher.predict(data.x_transfer).astype(np.float32))


def test_an_incomplete_or_foreign_store_is_refused(teacher_dir, tmp_path):
    teacher, data = _teacher(teacher_dir)
    out = tmp_path / "st.zarr"
    scale.write_store(teacher, data, out, rows=300, chunk_rows=100, progress=False)
    g = zarr.open_group(str(out), mode="r+")
    g.attrs["minikd"] = {**g.attrs["minikd"], "complete": False}   # as a write killed before its end leaves it
    with pytest.raises(mk.checks.UserError, match="incomplete"):
        scale.SoftTargetStore(out)
    g.attrs["minikd"] = {**g.attrs["minikd"], "complete": True, "teacher_fingerprint": "0" * 16}
    with pytest.raises(mk.checks.UserError, match="another teacher"):
        scale.SoftTargetStore(out).check_matches(teacher, data)


# ---------------------------------------------------------------- streaming

class RecordingStore(scale.SoftTargetStore):
    def __init__(self, path):
        super().__init__(path)
        self.reads = []

    def read(self, name, c):
        rows = super().read(name, c)
        self.reads.append((name, c, len(rows)))
        return rows


@pytest.mark.parametrize("top_k", [None, 3])
def test_training_streamed_from_the_store_equals_training_from_memory(teacher_dir, tmp_path, top_k):
    teacher, data = _teacher(teacher_dir)
    out = tmp_path / "st.zarr"
    scale.write_store(teacher, data, out, rows=1000, chunk_rows=300, top_k=top_k, progress=False)
    store = RecordingStore(out)
    a = _arrays(out)
    if top_k is None:
        memory = TransferChunks(a["x"], teacher.predict(a["x"]).astype(np.float32), 300)
    else:
        idx, values = mk.topk_from_dense(teacher.predict(a["x"]).astype(np.float32), top_k)
        memory = _TopKChunks(a["x"], idx, values, 300)
    tl = teacher.predict(data.x_train).astype(np.float32)
    cfg = TrainConfig(epochs=2, batch_size=64, seed=3)
    runs = [train_student(data, cfg, teacher_logits=tl, transfer=t, hidden=8, progress=False) for t in (store, memory)]
    (m1, h1), (m2, h2) = runs
    w1, w2 = mk.nn.state_dict(m1), mk.nn.state_dict(m2)
    assert all(np.array_equal(w1[k], w2[k]) for k in w1) and h1 == h2
    # every read is one chunk (never the whole array); each chunk once an epoch
    assert all(n <= 300 for _, _, n in store.reads)
    assert sorted(c for name, c, _ in store.reads if name == "x") == sorted(list(range(4)) * 2)


class _TopKChunks(TransferChunks):
    def __init__(self, x, indices, values, chunk_rows):
        super().__init__(x, values, chunk_rows)
        self.indices = indices

    def chunk(self, c):
        s = slice(c * self.chunk_rows, (c + 1) * self.chunk_rows)
        return self.x[s], mk.TopK(self.indices[s], self.logits[s], T_gen=1.0, variant="tail")


def test_student_cli_streams_from_a_store(teacher_dir, tmp_path, capsys):
    store = tmp_path / "st.zarr"
    assert main(["soft-targets", str(teacher_dir), "--out", str(store), "--rows", "500", "--chunk-rows", "200",
                 "--quiet"]) == 0
    assert "x and logits of 500 transfer rows" in capsys.readouterr().out
    assert main(["student", str(teacher_dir), "--soft-targets", str(store), "--transfer-epochs", "1",
                 "--student-hidden", "8", "--out", str(tmp_path / "s"), "--no-cache", "--quiet"]) == 0
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["student_kd"]["name"].endswith("+ store (500)")


# ---------------------------------------------------------------- sweeps

def _sweep(out, **kw):
    config = SweepConfig(samples=400, transfer_samples=300, T=(1.0, 4.0), alpha=(0.5, 0.9), transfer_epochs=1,
                         teacher_epochs=1, teacher_width=4, student_hidden=8, out=str(out), cache_dir=None,
                         progress=False, **{k: v for k, v in kw.items() if k != "on_step"})
    return run_sweep(config, on_step=kw.get("on_step"))


def _same_sweep(a, b):
    assert a.results["grid"] == b.results["grid"]
    drop = ("inference_us_per_sample",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in a.rows] == \
        [{k: v for k, v in r.items() if k not in drop} for r in b.rows]
    assert (a.out / "sweep.png").read_bytes() == (b.out / "sweep.png").read_bytes()
    wa, wb = (mk.nn.state_dict(load_student(r.out)[0]) for r in (a, b))
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)


def _after(seconds, value, offset=0):
    import time
    time.sleep(seconds)
    return value + offset


def test_tasks_results_come_in_call_order_not_completion_order(cluster):
    # the first calls sleep longest: they finish last on two workers
    calls = [((0.2 * (4 - i), i), {}) for i in range(4)]
    assert scale.run_tasks(cluster, _after, calls, {"offset": 10}, "order", progress=False) == [10, 11, 12, 13]


def test_sweep_on_the_cluster_equals_the_serial_sweep_with_a_worker_killed(cluster, tmp_path):
    # two seeds: each (T, alpha, seed) student is a task, each (T, alpha) scored by the mean
    serial = _sweep(tmp_path / "serial", seeds=(0, 3))
    address = cluster.scheduler.address
    on_cluster = _sweep(tmp_path / "cluster", seeds=(0, 3), scheduler=address, on_step=KillOnStep(tmp_path / "killed"))
    assert (tmp_path / "killed").exists()   # one worker died in the middle of a student
    _same_sweep(serial, on_cluster)
    grid = serial.results["grid"]
    per_seed = np.array(grid["val_accuracy_per_seed"])   # seed x T x alpha
    assert grid["seeds"] == [0, 3] and per_seed.shape == (2, 2, 2)
    np.testing.assert_allclose(grid["val_accuracy"], per_seed.mean(axis=0), rtol=0, atol=1e-15)
    assert not np.array_equal(per_seed[0], per_seed[1])   # the seeds reached the students (init, batches)
    # each seed's accuracies are those of a sweep of that seed alone (the data stay --seed's)
    alone = _sweep(tmp_path / "alone", seeds=(3,))
    np.testing.assert_array_equal(per_seed[1], alone.results["grid"]["val_accuracy"])


# ---------------------------------------------------------------- without the extra, and the CLI's checks

def _exit_code(argv):
    try:
        return main(argv)
    except SystemExit as exc:   # argparse's errors (a config option's check)
        return exc.code


def test_without_the_extra_each_option_says_what_to_install(teacher_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "zarr", None)   # import zarr now raises ImportError
    out = ["--out", str(tmp_path / "o")]
    for argv in (["sweep", "--workers", "2", *out], ["sweep", "--scheduler", "tcp://127.0.0.1:1", *out],
                 ["soft-targets", str(teacher_dir), "--out", str(tmp_path / "s.zarr")],
                 ["student", str(teacher_dir), "--soft-targets", str(tmp_path / "s.zarr"), *out]):
        (tmp_path / "s.zarr").mkdir(exist_ok=True)
        assert _exit_code(argv) == 2
        err = capsys.readouterr().err.strip()
        assert 'pip install "minikd[scale]"' in err and len(err.splitlines()) == 1, err


def test_store_options_need_a_store_and_a_bad_scheduler_is_one_line(teacher_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(scale, "CONNECT_TIMEOUT", "1s")
    assert main(["soft-targets", str(teacher_dir), "--out", str(tmp_path / "s.npz"), "--rows", "10"]) == 2
    assert "only a soft-target store takes it" in capsys.readouterr().err
    assert main(["soft-targets", str(teacher_dir), "--out", str(tmp_path / "s.zarr"), "--rows", "10",
                 "--scheduler", "tcp://127.0.0.1:9", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "scheduler tcp://127.0.0.1:9: cannot connect" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s.zarr").exists() and _leftovers(tmp_path) == []
