"""The distillation pipeline and CLI on a small budget (the full-size run is in the README)."""
import json

import numpy as np
import pytest

from minikd import data as D
from minikd.cli import main
from minikd.files import atomic_write

SMALL = ["--samples", "600", "--transfer-samples", "0", "--teacher-epochs", "3", "--epochs", "3", "--transfer-epochs", "1",
         "--quiet", "--teacher-width", "8", "--student-hidden", "16"]


def run(args, tmp_path, name="out"):
    out = tmp_path / name
    assert main(["distill", *SMALL, "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *args]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_distill_end_to_end_and_reproducible(tmp_path, capsys):
    out, rep = run(["--transfer-samples", "300"], tmp_path)
    for key in ("teacher", "student_scratch", "student_kd", "student_kd_transfer"):
        assert 0.0 <= rep[key]["test_accuracy"] <= 1.0
    assert rep["student_kd"]["T"] == 4.0 and rep["student_kd"]["alpha"] == 0.9 and rep["seconds"] > 0
    assert rep["student_kd"]["parameters"] < rep["teacher"]["parameters"]
    assert {p.name for p in out.iterdir()} >= {"student.npz", "student.json", "teacher.npz", "teacher.json",
                                               "report.json", "learning_curves.png"}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    printed = capsys.readouterr().out
    assert "student KD + transfer (300)" in printed and "teacher (CNN)" in printed
    # the same seed gives the same report (timings aside); the cached teacher is reused
    _, rep2 = run(["--transfer-samples", "300"], tmp_path, "out2")
    for key in ("teacher", "student_scratch", "student_kd", "student_kd_transfer"):
        assert rep2[key]["test_accuracy"] == rep[key]["test_accuracy"]
        assert rep2[key]["val_accuracy"] == rep[key]["val_accuracy"]
    # evaluate and predict the exported student
    assert main(["evaluate", str(out)]) == 0
    assert f"test accuracy {rep['student_kd_transfer']['test_accuracy']:.4f}" in capsys.readouterr().out
    x = np.random.default_rng(0).standard_normal((4, 40))
    np.save(tmp_path / "x.npy", x)
    assert main(["predict", str(out), "--input", str(tmp_path / "x.npy"), "--output", str(tmp_path / "p.npy")]) == 0
    pred = np.load(tmp_path / "p.npy")
    assert pred.shape == (4,) and pred.min() >= 0 and pred.max() < 10


def test_sweep(tmp_path, capsys):
    out = tmp_path / "sw"
    assert main(["sweep", *SMALL, "--T", "1", "4", "--alpha", "0.5", "1.0", "--out", str(out),
                 "--cache-dir", str(tmp_path / "cache")]) == 0
    rep = json.loads((out / "report.json").read_text())
    grid = np.array(rep["grid"]["val_accuracy"])
    assert grid.shape == (2, 2)
    best = np.unravel_index(np.argmax(grid), grid.shape)
    assert rep["student_kd"]["T"] == [1.0, 4.0][best[0]] and rep["student_kd"]["alpha"] == [0.5, 1.0][best[1]]
    assert (out / "sweep.png").stat().st_size > 1000


def test_user_npz(tmp_path):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    x = rng.standard_normal((300, 12)) + 2 * np.eye(3, 12)[y]
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    d = D.from_npz(tmp_path / "mine.npz")
    assert d.num_classes == 3 and len(d.x_test) == 60 and d.x_train.shape[1] == 12
    np.testing.assert_allclose(d.x_train.mean(0), 0, atol=1e-5)  # fitted on train only
    out, rep = run(["--data", str(tmp_path / "mine.npz")], tmp_path)
    assert rep["dataset"]["kind"] == "npz"


@pytest.mark.parametrize("content, msg", [
    (dict(x=np.zeros((20, 3))), "expected arrays 'x' and 'y'"),
    (dict(x=np.zeros((20, 3, 2)), y=np.zeros(20, int)), "x must be a 2-D numeric array"),
    (dict(x=np.zeros((20, 3)), y=np.zeros(19, int)), "y must be integer labels of shape \\(20,\\)"),
    (dict(x=np.full((20, 3), np.nan), y=np.arange(20) % 2), "x: row 0 contains nan"),
    (dict(x=np.zeros((20, 3)), y=np.arange(20) % 2, x_test=np.zeros((5, 4)), y_test=np.zeros(5, int)),
     "x_test must have 3 features like x"),
])
def test_bad_npz_errors(tmp_path, content, msg, capsys):
    np.savez(tmp_path / "bad.npz", **content)
    with pytest.raises(ValueError, match=msg):
        D.from_npz(tmp_path / "bad.npz")
    assert main(["distill", "--data", str(tmp_path / "bad.npz"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("minikd distill: error:") and err.count("\n") == 1


def test_cli_errors(tmp_path, capsys):
    (tmp_path / "junk.npz").write_text("not a zip")
    assert main(["distill", "--data", str(tmp_path / "junk.npz")]) == 2
    assert "not a NumPy file" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["distill", "--bogus"])
    assert e.value.code == 2
    with pytest.raises(SystemExit):
        main(["distill", "--epochs", "0"])


def test_atomic_write_leaves_nothing_on_interrupt(tmp_path):
    def boom(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        atomic_write(tmp_path / "f.txt", boom)
    assert list(tmp_path.iterdir()) == []


def test_mnist1d_is_seeded_and_leaves_global_rng_alone():
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    a = D.mnist1d(200, seed=3)
    assert np.random.random() == before
    b = D.mnist1d(200, seed=3)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.shape[1] == 40 and a.num_classes == 10


def test_feature_and_relational_variants(tmp_path):
    out, rep = run(["--hint", "embed:hidden:0.5", "--hint", "relu4:fc1", "--rkd-distance", "25",
                    "--rkd-angle", "50"], tmp_path)
    for key in ("student_kd_hint", "student_kd_rkd_distance", "student_kd_rkd_angle"):
        assert 0.0 <= rep[key]["test_accuracy"] <= 1.0
    assert rep["student_kd_hint"]["terms"] == [["hint", "embed", "hidden", 0.5], ["hint", "relu4", "fc1", 1.0]]


@pytest.mark.parametrize("args, msg", [
    (["--hint", "embed"], "expected TEACHER_TAP:STUDENT_TAP"),
    (["--hint", "embed:hidden:x"], "the weight 'x' is not a number"),
    (["--rkd-distance", "1", "--rkd-taps", "embed"], "TEACHER_TAP:STUDENT_TAP, got 'embed'"),
    (["--hint", "nope:hidden"], "teacher tap 'nope': no such layer"),
    (["--hint", "embed:nope"], "student tap 'nope': no such layer"),
])
def test_variant_errors(tmp_path, capsys, args, msg):
    with pytest.raises(SystemExit) as e:
        main(["distill", *SMALL, "--out", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"), *args])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_mutual_command(tmp_path, capsys):
    out = tmp_path / "mut"
    assert main(["mutual", "--models", "3", "--samples", "600", "--epochs", "2", "--quiet", "--student-hidden", "16",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert len(rep["mutual"]) == 3 and len(rep["independent"]) == 3
    assert "mean test accuracy: mutual" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["mutual", "--models", "1", "--quiet"])


def test_steps_one_at_a_time(tmp_path, capsys):
    """Step 1 (teacher), step 2 (soft targets) and step 3 (student) as separate commands."""
    cache = ["--quiet", "--cache-dir", str(tmp_path / "c")]
    assert main(["teacher", "--samples", "600", *cache, "--teacher-epochs", "2", "--teacher-width", "8",
                 "--out", str(tmp_path / "t")]) == 0
    assert main(["soft-targets", str(tmp_path / "t"), "--out", str(tmp_path / "st.npz")]) == 0
    with np.load(tmp_path / "st.npz") as st:
        assert st["logits_train"].shape == (432, 10) and st["y_train"].shape == (432,)
    assert main(["student", str(tmp_path / "t"), *cache, "--epochs", "2", "--student-hidden", "8",
                 "--out", str(tmp_path / "s")]) == 0
    rep = json.loads((tmp_path / "s" / "report.json").read_text())
    assert rep["student_kd"]["T"] == 4.0 and 0 <= rep["student_kd"]["test_accuracy"] <= 1
    assert rep["teacher_dir"] == str(tmp_path / "t") and rep["dataset"]["samples"] == 600
    assert main(["evaluate", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["student", str(tmp_path / "missing"), "--quiet"])
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.parametrize("command, option", [
    # options a sub-command accepted and ignored before: each is refused now
    (["teacher"], ["--alpha", "0.5"]), (["teacher"], ["--T", "2"]), (["teacher"], ["--epochs", "3"]),
    (["teacher"], ["--backend", "numba"]), (["teacher"], ["--hint", "embed:hidden"]),
    (["teacher"], ["--transfer-samples", "10"]), (["teacher"], ["--weight-decay", "0.1"]),
    (["mutual"], ["--hint", "embed:hidden"]), (["mutual"], ["--rkd-distance", "25"]), (["mutual"], ["--alpha", "0.5"]),
    (["mutual"], ["--backend", "numba"]), (["mutual"], ["--teacher-epochs", "3"]), (["mutual"], ["--no-cache"]),
    (["student", "t"], ["--data", "x.npz"]), (["student", "t"], ["--samples", "600"]),
    (["student", "t"], ["--teacher-width", "8"]), (["student", "t"], ["--hint", "embed:hidden"]),
    (["sweep"], ["--hint", "embed:hidden"]),
])
def test_options_a_command_does_not_use_are_refused(command, option, capsys):
    with pytest.raises(SystemExit) as e:
        main([*command, *option])
    assert e.value.code == 2
    assert f"unrecognized arguments: {' '.join(option)}" in capsys.readouterr().err


def test_cache_dir_and_no_cache_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as e:
        main(["distill", "--cache-dir", "c", "--no-cache"])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_every_option_is_a_config_field():
    """The parsers are built from the experiments' configs: each sub-command's options are exactly
    its config's fields (so an option it lists is one its experiment reads) with its defaults."""
    from dataclasses import fields

    from minikd import experiments as ex
    from minikd.cli import build_parser
    sub = build_parser()._subparsers._group_actions[0].choices
    for command, config in [("distill", ex.DistillConfig), ("sweep", ex.SweepConfig), ("teacher", ex.TeacherConfig),
                            ("student", ex.StudentConfig), ("mutual", ex.MutualConfig)]:
        dests = {a.dest for a in sub[command]._actions if a.dest != "help"}
        assert dests == {f.name for f in fields(config)}, command
        args = sub[command].parse_args(["t"] if command == "student" else [])
        default = config(teacher_dir="t") if command == "student" else config()
        assert {f.name: getattr(args, f.name) for f in fields(config)} == {
            k: list(v) if isinstance(v, tuple) else v for k, v in vars(default).items()}, command


def test_internal_errors_keep_their_traceback(monkeypatch, capsys):
    """Only a user's mistake (a UserError, an OSError, ...) becomes a one-line error; a TypeError or
    a plain ValueError (a broadcasting bug, say) is a bug in minikd and keeps its traceback."""
    from minikd import experiments
    from minikd.checks import UserError

    for bug in (TypeError("unsupported operand type(s)"), ValueError("operands could not be broadcast together")):
        def raise_bug(config, bug=bug):
            raise bug
        monkeypatch.setattr(experiments, "run_distill", raise_bug)
        with pytest.raises(type(bug), match=str(bug)[:20]):
            main(["distill", "--quiet"])

    def mistake(config):
        raise UserError("samples: need at least 50, got 3")
    monkeypatch.setattr(experiments, "run_distill", mistake)
    assert main(["distill", "--quiet"]) == 2
    assert capsys.readouterr().err == "minikd distill: error: samples: need at least 50, got 3\n"
