"""A user's mistakes and the environment's faults, as a new user makes them: each ends in one line
on stderr naming the option or file, a non-zero exit code, before any work for option and path
mistakes; nothing half-written; no silent wrong number. Grouped as issue 13 groups them."""
import errno
import json
import os
import shutil
import zipfile

import numpy as np
import pytest

from minikd import data as D
from minikd import distill, experiments, files
from minikd.cli import main

SMALL = ["--samples", "600", "--transfer-samples", "0", "--teacher-epochs", "2", "--epochs", "2", "--quiet",
         "--teacher-width", "8", "--student-hidden", "16"]


def one_line_error(capsys, command, *fragments):
    err = capsys.readouterr().err
    assert err.startswith(f"minikd {command}: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, (f, err)
    return err


@pytest.fixture
def no_training(monkeypatch):
    """Any training (or data generation) from here on fails the test: the mistake had to be found first."""
    def forbidden(*a, **k):
        raise AssertionError("work started before the mistake was found")
    monkeypatch.setattr(distill, "train", forbidden)
    monkeypatch.setattr(D, "_generate_mnist1d", forbidden)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small distill run's output folder and its cache (shared; tests copy before they damage)."""
    root = tmp_path_factory.mktemp("trained")
    assert main(["distill", *SMALL, "--out", str(root / "out"), "--cache-dir", str(root / "cache")]) == 0
    return root


# ---------------------------------------------------------------- found too late: options and paths first

@pytest.mark.parametrize("command, args, option, fragment", [
    (["distill"], ["--T", "-1"], "--T", "in [0.01, 1000], got -1"),
    (["distill"], ["--T", "nan"], "--T", "finite"),
    (["distill"], ["--T", "-inf"], "--T", "got -inf"),
    (["distill"], ["--T", "1e200"], "--T", "in [0.01, 1000]"),
    (["distill"], ["--alpha", "2"], "--alpha", "[0, 1]"),
    (["distill"], ["--lr", "-1"], "--lr", "> 0"),
    (["distill"], ["--lr", "-1e-3"], "--lr", "> 0, got -0.001"),
    (["distill"], ["--weight-decay", "1000"], "--weight-decay", "lr x weight_decay < 1"),
    (["distill"], ["--samples", "1000000000000"], "--samples", "<= 10000000"),
    (["distill"], ["--teacher-width", "100000"], "--teacher-width", "<= 4096"),
    (["distill"], ["--student-hidden", "100000"], "--student-hidden", "<= 4096"),
    (["distill"], ["--lr", "nan"], "--lr", "got nan"),
    (["distill"], ["--lr", "inf"], "--lr", "finite"),
    (["distill"], ["--weight-decay", "-0.1"], "--weight-decay", ">= 0"),
    (["distill"], ["--batch-size", "1"], "--batch-size", ">= 2"),
    (["distill"], ["--epochs", "0"], "--epochs", ">= 1 and <= 100000"),
    (["distill"], ["--epochs", "abc"], "--epochs", "invalid int value"),
    (["distill"], ["--seed", "-1"], "--seed", ">= 0"),
    (["distill"], ["--samples", "10"], "--samples", ">= 50"),
    (["distill"], ["--transfer-samples", "-5"], "--transfer-samples", ">= 0"),
    (["distill"], ["--teacher-width", "0"], "--teacher-width", ">= 1 and <= 4096"),
    (["distill"], ["--rkd-distance", "-25"], "--rkd-distance", ">= 0"),
    (["distill"], ["--rkd-angle", "nan"], "--rkd-angle", "finite"),
    (["distill"], ["--hint", "embed:hidden:-1"], "--hint", ">= 0"),
    (["distill"], ["--hint", "embed:nope"], "--hint", "student tap 'nope'"),
    (["distill"], ["--rkd-distance", "1", "--rkd-taps", "embed"], "--rkd-taps", "TEACHER_TAP:STUDENT_TAP"),
    (["distill"], ["--data", "/nonexistent/mine.npz"], "--data", "no such file"),
    (["sweep"], ["--T", "1", "-2"], "--T", "got -2"),
    (["sweep"], ["--alpha", "0.5", "1.5"], "--alpha", "got 1.5"),
    (["teacher"], ["--lr", "0"], "--lr", "> 0"),
    (["mutual"], ["--models", "1"], "--models", ">= 2"),
    (["mutual"], ["--T", "0"], "--T", "got 0"),
    (["student", "/nonexistent-teacher"], [], "teacher_dir", "no such folder"),
])
def test_a_bad_option_fails_before_any_work(command, args, option, fragment, no_training, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, *args, "--out", str(tmp_path / "o")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {option}: " in err and fragment in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["gradcheck", "--rtol", "-1"], "argument --rtol: expected a finite number > 0"),
    (["verify", "--rtol", "nan"], "argument --rtol: expected a finite number > 0, got nan"),
    (["gradcheck", "--seed", "-2"], "argument --seed: expected an integer >= 0"),
    (["evaluate", "d", "--name", ""], "argument --name: expected a model name"),
    (["predict", "d", "--input", "x.npy", "--name", "../student"], "argument --name: expected a model name"),
    (["soft-targets", "t", "--out", "s.npz", "--transfer-samples", "-1"], "argument --transfer-samples: expected an "
                                                                         "integer >= 0"),
])
def test_the_other_commands_check_their_options(argv, fragment, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and fragment in err, err


def test_the_api_checks_its_configs_too(no_training):
    with pytest.raises(experiments.ConfigError, match="lr: expected a finite number > 0") as e:
        experiments.run_distill(experiments.DistillConfig(lr=-1.0))
    assert e.value.field == "lr"
    for bad in (dict(T="4"), dict(T=True), dict(alpha=None), dict(samples=2.0), dict(progress="no")):
        with pytest.raises(experiments.ConfigError) as e:
            experiments.validate(experiments.DistillConfig(**bad))
        assert e.value.field == next(iter(bad))
    with pytest.raises(experiments.ConfigError, match="teacher_dir: expected a path, got None"):
        experiments.validate(experiments.StudentConfig(teacher_dir=None))
    with pytest.raises(experiments.ConfigError, match="T: expected a finite number"):
        experiments.validate(experiments.SweepConfig(T="48"))   # not the temperatures 4 and 8
    # checked values are stored as plain Python numbers (report.json holds them), a lone T as a list
    config = experiments.DistillConfig(samples=np.int64(300), T=np.float32(2.0), out=tmp_path_like("o"))
    experiments.validate(config)
    assert type(config.samples) is int and type(config.T) is float and config.out == "o"
    sweep = experiments.SweepConfig(T=4.0)
    experiments.validate(sweep)
    assert sweep.T == (4.0,)
    with pytest.raises(ValueError, match="batch_size: expected an integer >= 2"):
        distill.TrainConfig(batch_size=1)
    with pytest.raises(ValueError, match="epochs: expected a positive integer, got 2.5"):
        distill.TrainConfig(epochs=2.5)


@pytest.mark.parametrize("option", ["--out", "--cache-dir"])
def test_an_unusable_folder_fails_before_any_work(option, no_training, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    name = option.lstrip("-").replace("-", "_")
    for path, fragment in [(tmp_path / "a-file", "exists and is not a folder"),
                           (tmp_path / "a-file" / "sub", "cannot write there")]:
        assert main(["distill", *SMALL, option, str(path)]) == 2
        one_line_error(capsys, "distill", f"{name} {path}", fragment)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_a_read_only_folder_fails_before_any_work(no_training, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(["distill", *SMALL, "--out", str(ro / "out")]) == 2
        one_line_error(capsys, "distill", "cannot write there")
    finally:
        ro.chmod(0o755)


def tmp_path_like(name):
    from pathlib import PurePosixPath
    return PurePosixPath(name)


def test_an_output_file_that_is_a_folder_fails_before_any_work(no_training, tmp_path, capsys):
    (tmp_path / "out" / "report.json").mkdir(parents=True)
    assert main(["distill", *SMALL, "--out", str(tmp_path / "out")]) == 2
    one_line_error(capsys, "distill", f"out {tmp_path / 'out' / 'report.json'}: is a folder")


def test_a_full_disk_is_one_line_and_keeps_the_old_files(trained, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    shutil.copytree(trained / "out", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(f, *arrays, **named):   # as a full disk fails a write: no file named
        f.write(b"PK\x03\x04 half of it")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(files.np, "savez", full)
    assert main(["distill", *SMALL, "--out", str(out), "--cache-dir", str(trained / "cache")]) == 2
    one_line_error(capsys, "distill", f"{out / 'teacher.npz'}: No space left on device")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before   # no temporary file, nothing changed


def test_soft_targets_out_checked_before_work(trained, tmp_path, capsys):
    (tmp_path / "dir.npz").mkdir()
    assert main(["soft-targets", str(trained / "out"), "--out", str(tmp_path / "dir.npz")]) == 2
    one_line_error(capsys, "soft-targets", "is a folder")
    with pytest.raises(SystemExit):
        main(["soft-targets", str(trained / "out"), "--out", str(tmp_path / "s.npz"), "--transfer-samples", "-1"])


# ---------------------------------------------------------------- silent wrong numbers

def _npz(tmp_path, **arrays):
    rng = np.random.default_rng(0)
    base = dict(x=rng.standard_normal((60, 5)), y=np.arange(60) % 3)
    path = tmp_path / "mine.npz"
    np.savez(path, **{k: v for k, v in {**base, **arrays}.items() if v is not None})
    return path


@pytest.mark.parametrize("arrays, fragment", [
    (dict(x_test=np.full((4, 5), np.nan), y_test=np.zeros(4, int)), "x_test: row 0 contains nan"),
    (dict(x_test=np.zeros((4, 5)), y_test=np.array([0, 1, -1, 2])), "y_test row 2 has label -1"),
    (dict(x_test=np.zeros((4, 5)), y_test=np.array([0, 1, 7, 2])), "y_test row 2 has label 7, but y has classes 0..2"),
    (dict(x_transfer=np.r_[np.zeros((3, 5)), [[0, 0, np.inf, 0, 0]]]), "x_transfer: row 3 contains inf"),
    (dict(y=np.r_[np.arange(59) % 3, 200000]), "y row 59 has label 200000, far beyond the others"),
    (dict(y=np.zeros(60, int)), "at least 2 classes"),
    (dict(x=np.random.default_rng(0).standard_normal((60, 5)) * 1e300), "x feature 0: values too large"),
    (dict(x_test=np.zeros((4, 5))), "x_test and y_test come together"),
    (dict(X_test=np.zeros((4, 5))), "unexpected array(s) ['X_test']"),
    (dict(y=(np.arange(60) % 3).astype(float)), "y must be integer labels"),
    (dict(y=np.array([*(np.arange(59) % 3), 2**63], dtype=np.uint64)), "y row 59 has label 9223372036854775808"),
])
def test_data_that_would_give_wrong_numbers_is_refused(arrays, fragment, tmp_path, no_training, capsys):
    path = _npz(tmp_path, **arrays)
    with pytest.raises(files.FileError) as e:
        D.from_npz(path)
    assert fragment in str(e.value) and str(path) in str(e.value)
    assert main(["distill", "--data", str(path), "--quiet", "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "distill", fragment)


def test_too_few_features_for_the_teacher_name_the_file(tmp_path, capsys):
    path = tmp_path / "narrow.npz"
    np.savez(path, x=np.random.default_rng(0).standard_normal((60, 3)), y=np.arange(60) % 3)
    assert main(["distill", "--data", str(path), *SMALL, "--no-cache", "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "distill", f"{path}: x has 3 features; the teacher CNN needs at least 4")


def test_predict_refuses_non_finite_rows_and_writes_exactly_the_named_file(trained, tmp_path, capsys):
    x = np.random.default_rng(0).standard_normal((5, 40))
    x[3, 7] = np.nan
    np.save(tmp_path / "x.npy", x)
    assert main(["predict", str(trained / "out"), "--input", str(tmp_path / "x.npy")]) == 2
    err = one_line_error(capsys, "predict", "input: row 3 contains nan (every value must be finite)")
    assert "standardization" not in err
    x[3, 7] = 1e300   # finite, but not once standardized to float32
    np.save(tmp_path / "x.npy", x)
    assert main(["predict", str(trained / "out"), "--input", str(tmp_path / "x.npy")]) == 2
    one_line_error(capsys, "predict", "after standardization (values too large): row 3 contains inf")
    x[3, 7] = 0.0
    np.savez(tmp_path / "x.npz", x=x)   # an .npz with an array x is read too
    assert main(["predict", str(trained / "out"), "--input", str(tmp_path / "x.npz"),
                 "--output", str(tmp_path / "pred")]) == 0
    assert files.read_npy(tmp_path / "pred").shape == (5,) and not (tmp_path / "pred.npy").exists()
    np.savez(tmp_path / "two.npz", a=x, b=x)
    assert main(["predict", str(trained / "out"), "--input", str(tmp_path / "two.npz")]) == 2
    one_line_error(capsys, "predict", "an .npz with an array 'x'")


def test_predict_checks_its_output_before_loading_anything(trained, tmp_path, monkeypatch, capsys):
    def forbidden(*a, **k):
        raise AssertionError("the model was loaded before the output was checked")
    monkeypatch.setattr(experiments, "load_student", forbidden)
    (tmp_path / "a-file").write_text("x")
    assert main(["predict", str(trained / "out"), "--input", "x.npy", "--output", str(tmp_path / "a-file" / "p")]) == 2
    one_line_error(capsys, "predict", "output's folder", "exists and is not a folder")


def test_a_folder_that_refuses_writes_is_found_by_the_probe(tmp_path, monkeypatch):
    """Root writes anywhere, so the refusal is simulated: writable_dir must write, not only mkdir."""
    (tmp_path / "exists").mkdir()

    def refuse(self, data):
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(files.Path, "write_bytes", refuse)
    with pytest.raises(files.FileError, match="out .*exists: cannot write there \\(Permission denied\\)"):
        files.writable_dir(tmp_path / "exists", "out")


def test_a_model_with_nan_weights_is_refused(trained, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(trained / "out", out)
    weights = files.read_npz(out / "student.npz")
    weights["fc2.weight"][1, 2] = np.nan
    np.savez(out / "student.npz", **weights)
    assert main(["evaluate", str(out)]) == 2
    one_line_error(capsys, "evaluate", "student.npz: weight fc2.weight: row 1 contains nan")
    weights["fc2.weight"] = weights["fc2.weight"].astype(str)
    np.savez(out / "student.npz", **weights)
    assert main(["evaluate", str(out)]) == 2
    one_line_error(capsys, "evaluate", "student.npz: fc2.weight has dtype <U", "expected numbers")
    teacher = files.read_npz(out / "teacher.npz")
    teacher["bn1.running_var"][0] = -1.0   # finite, but no variance: a silent 5% accuracy before
    np.savez(out / "teacher.npz", **teacher)
    assert main(["evaluate", str(out), "--name", "teacher"]) == 2
    one_line_error(capsys, "evaluate", "teacher.npz: bn1.running_var has a negative variance")


def test_training_that_diverges_stops_with_the_learning_rate_named(tmp_path, capsys):
    assert main(["mutual", "--samples", "200", "--epochs", "2", "--quiet", "--lr", "1e30", "--weight-decay", "0",
                 "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "mutual", "training diverged", "lower learning rate than 1e+30")
    assert main(["teacher", "--samples", "200", "--teacher-epochs", "2", "--teacher-width", "4", "--quiet",
                 "--lr", "1e30", "--no-cache", "--out", str(tmp_path / "t")]) == 2
    one_line_error(capsys, "teacher", "teacher: training diverged in epoch 1", "lower learning rate than 1e+30")


# ---------------------------------------------------------------- tracebacks for a user's mistake

def _damage(path, how):
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "text":
        path.write_text("this is not numpy\n")
    elif how == "garbage":
        path.write_bytes(os.urandom(300))


@pytest.mark.parametrize("how, fragment", [("truncated", "truncated"), ("empty", "the file is empty"),
                                           ("text", "not a NumPy file"), ("garbage", "not a NumPy file")])
def test_a_damaged_model_file_is_one_line(how, fragment, trained, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(trained / "out", out)
    _damage(out / "student.npz", how)
    for command in (["evaluate", str(out)], ["predict", str(out), "--input", str(out / "student.npz")]):
        assert main(command) == 2
        err = one_line_error(capsys, command[0], "student.npz", fragment)
        assert "pickle" not in err


@pytest.mark.parametrize("edit, fragment", [
    (lambda a: a["extra"].pop("mean"), "missing 'mean'"),
    (lambda a: a.pop("layers"), "'layers' must be a non-empty list"),
    (lambda a: a["layers"][0]["args"].update(in_features=0), "cannot be built"),
    (lambda a: a["layers"][0].update(type="Evil"), "unknown layer type 'Evil'"),
    (lambda a: a["extra"].update(num_classes=7), "'num_classes' is 7"),
    (lambda a: a["extra"]["dataset"].pop("seed"), "missing 'seed'"),
    (lambda a: a["extra"].update(mean=a["extra"]["mean"][:-1]), "'mean' and 'std' must be equally long"),
    (lambda a: a["extra"].update(mean=a["extra"]["mean"][:-1], std=a["extra"]["std"][:-1]),
     "does not take 39 features"),
    (lambda a: a["extra"].update(std=[0.0] * len(a["extra"]["std"])), "std > 0"),
    (lambda a: a["extra"]["dataset"].update(samples="abc"), "the dataset spec's samples: expected an integer"),
    (lambda a: a["extra"]["dataset"].update(seed=-1), "the dataset spec's seed: expected an integer >= 0"),
    (lambda a: a["extra"]["dataset"].update(val_fraction=5), "the dataset spec's val_fraction"),
    (lambda a: a["layers"][0]["args"].update(in_features=10**12), "do not fit in memory"),
])
def test_a_damaged_model_json_is_one_line(edit, fragment, trained, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(trained / "out", out)
    arch = json.loads((out / "student.json").read_text())
    edit(arch)
    (out / "student.json").write_text(json.dumps(arch))
    assert main(["evaluate", str(out)]) == 2
    one_line_error(capsys, "evaluate", fragment)


def test_a_json_nested_too_deeply_is_refused(tmp_path):
    (tmp_path / "m.json").write_text("[" * 100000)
    with pytest.raises(files.FileError, match="nested too deeply"):
        files.read_json(tmp_path / "m.json")


def test_an_array_header_promising_more_than_the_file_holds_is_corrupted(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((3, 4)))
    raw = (tmp_path / "a.npy").read_bytes()
    (tmp_path / "a.npy").write_bytes(raw.replace(b"(3, 4)", b"(10**12, 4)".replace(b"10**12", b"999999")))
    with pytest.raises(files.FileError, match="header promises 31999968 bytes"):
        files.read_npy(tmp_path / "a.npy")


def test_pickled_arrays_are_never_loaded(tmp_path, capsys):
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=np.arange(2))
    with pytest.raises(files.FileError, match="holds Python objects \\(pickled data\\), which minikd never loads"):
        files.read_npz(path)
    assert main(["distill", "--data", str(path), "--quiet", "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "distill", "never loads")


def test_out_of_memory_is_one_line(monkeypatch, capsys):
    def too_big(config):
        raise MemoryError
    monkeypatch.setattr(experiments, "run_distill", too_big)
    assert main(["distill", "--quiet"]) == 2
    one_line_error(capsys, "distill", "out of memory; lower --samples")


def test_ctrl_c_is_one_line(monkeypatch, capsys):
    def interrupted(config):
        raise KeyboardInterrupt
    monkeypatch.setattr(experiments, "run_distill", interrupted)
    assert main(["distill", "--quiet"]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("minikd distill: interrupted") and "\n" not in err


def test_importing_the_command_line_loads_no_numerics():
    """Ctrl-C is handled from the first instant of main: what runs before it (the console script's
    `from minikd.cli import main`) must be light, so it loads no NumPy (about 0.3 s before)."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", "import sys, minikd.cli; print(sorted(m for m in ('numpy', "
                          "'minikd.experiments', 'minikd.losses') if m in sys.modules))"],
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_real_ctrl_c_in_training_is_one_line_and_leaves_no_file(tmp_path):
    """SIGINT to a running `minikd distill` once its teacher is training (the progress bar shows)."""
    import select
    import signal
    import subprocess
    import sys
    import time
    p = subprocess.Popen([sys.executable, "-m", "minikd.cli", "distill", "--samples", "2000", "--teacher-epochs",
                          "200", "--no-cache", "--out", str(tmp_path / "o")], stderr=subprocess.PIPE)
    seen, deadline = b"", time.monotonic() + 120
    while b"teacher" not in seen and time.monotonic() < deadline:
        if select.select([p.stderr], [], [], 1.0)[0]:
            seen += os.read(p.stderr.fileno(), 4096)
    p.send_signal(signal.SIGINT)
    seen, rest = seen.decode(), p.communicate(timeout=60)[1].decode()
    assert p.returncode == 130, seen + rest
    last = rest.strip().splitlines()[-1]
    assert last.startswith("minikd distill: interrupted") and "Traceback" not in rest
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_a_missing_optional_dependency_is_one_line(monkeypatch, capsys):
    def no_torch(seed):
        raise ImportError("No module named 'torch'")
    monkeypatch.setattr("minikd.torch_parity.run_all", no_torch)
    assert main(["verify"]) == 2
    one_line_error(capsys, "verify", "pip install torch==2.13.0")


# ---------------------------------------------------------------- the cache heals itself

def test_a_corrupted_cache_entry_is_discarded_and_rebuilt(trained, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(trained / "cache", cache)
    entries = sorted(p.name for p in cache.iterdir())
    teacher_npz = next(cache.glob("teacher-*.npz"))
    soft = next(cache.glob("soft-targets-*.npy"))
    _damage(teacher_npz, "truncated")
    _damage(soft, "empty")
    assert main(["distill", *SMALL, "--out", str(tmp_path / "o"), "--cache-dir", str(cache)]) == 0
    err = capsys.readouterr().err
    assert err.count("discarded, rebuilding it") == 2, err
    assert sorted(p.name for p in cache.iterdir()) == entries   # rebuilt under the same keys
    want = json.loads((trained / "out" / "report.json").read_text())
    got = json.loads((tmp_path / "o" / "report.json").read_text())
    assert got["student_kd"]["test_accuracy"] == want["student_kd"]["test_accuracy"]
    assert main(["distill", *SMALL, "--out", str(tmp_path / "o2"), "--cache-dir", str(cache)]) == 0
    assert "discarded" not in capsys.readouterr().err   # healed: used as is
    # entries that load but are not what they should be: another dtype, another row count, a folder
    for bad in (lambda p: np.save(p, files.read_npy(p).astype(np.float64)),
                lambda p: np.save(p, files.read_npy(p)[:-1]),
                lambda p: (p.unlink(), p.mkdir())):
        bad(soft)
        assert main(["distill", *SMALL, "--out", str(tmp_path / "o3"), "--cache-dir", str(cache)]) == 0
        assert capsys.readouterr().err.count("discarded, rebuilding it") == 1
        assert soft.is_file() and files.read_npy(soft).dtype == np.float32


# ---------------------------------------------------------------- models usable from any folder

def test_an_exported_model_works_from_another_folder_and_notices_changed_data(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    rng = np.random.default_rng(1)
    y = np.arange(300) % 3
    np.savez("mine.npz", x=rng.standard_normal((300, 6)) + np.eye(3, 6)[y], y=y)
    assert main(["distill", "--data", "mine.npz", *SMALL, "--no-cache", "--out", "out"]) == 0
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", "work/out"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    np.savez(work / "mine.npz", x=rng.standard_normal((300, 6)), y=y)
    assert main(["evaluate", "work/out"]) == 2
    one_line_error(capsys, "evaluate", "changed since the model was trained")


# ---------------------------------------------------------------- the reader's own words

@pytest.mark.parametrize("content, fragment", [
    (b"", "the file is empty"), (b"hello, world\n", "not a NumPy file"),
    (b"PK\x03\x04garbage", "truncated or not a valid .npz"),
])
def test_the_reader_names_what_is_wrong(content, fragment, tmp_path):
    path = tmp_path / "f.npz"
    path.write_bytes(content)
    with pytest.raises(files.FileError, match=fragment) as e:
        files.read_npz(path)
    assert "pickle" not in str(e.value)
    with pytest.raises(files.FileError, match="no such file"):
        files.read_npz(tmp_path / "missing.npz")
    with pytest.raises(files.FileError, match="is a folder"):
        files.read_npz(tmp_path)


def test_a_zip_member_that_is_not_an_array_is_refused(tmp_path):
    with zipfile.ZipFile(tmp_path / "z.npz", "w") as z:
        z.writestr("x.npy", b"not an array")
    with pytest.raises(files.FileError, match="'x.npy' is not a NumPy array"):
        files.read_npz(tmp_path / "z.npz")


# ---------------------------------------------------------------- the API's own arguments

@pytest.mark.parametrize("make, fragment", [
    (lambda m: __import__("minikd").nn.AdamW(m, lr=-1.0), "AdamW: lr: expected a finite number > 0"),
    (lambda m: __import__("minikd").nn.Adam(m, lr=float("nan")), "Adam: lr: expected a finite number > 0, got nan"),
    (lambda m: __import__("minikd").nn.AdamW(m, weight_decay=-1.0), "AdamW: weight_decay: expected a finite number >= 0"),
    (lambda m: __import__("minikd").nn.Adam(m, betas=(2, 0.999)), "Adam: betas"),
    (lambda m: __import__("minikd").nn.SGD(m, lr="abc"), "SGD: lr: expected a finite number > 0, got 'abc'"),
])
def test_optimizers_refuse_bad_settings(make, fragment):
    from minikd.checks import UserError
    from minikd.nn.models import student_mlp
    with pytest.raises(UserError) as e:
        make(student_mlp(4, 2, 3))
    assert fragment in str(e.value)


def test_a_save_that_cannot_be_written_writes_nothing(tmp_path):
    from minikd import nn
    from minikd.nn.models import student_mlp
    with pytest.raises(TypeError):
        nn.save(student_mlp(4, 2, 3), tmp_path / "m", extra={"not json": object()})
    assert list(tmp_path.iterdir()) == []
