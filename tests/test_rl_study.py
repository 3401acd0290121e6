"""The RL study runner: config validation, resume after interruption (a killed process), backends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

pytest.importorskip("stable_baselines3")
from kama.cli import main  # noqa: E402
from kama.rl.study import StudyConfig, expand, is_finished, load_study_config, run_id, run_study  # noqa: E402
from kama.rl.train import RunConfig  # noqa: E402

TINY = {"tasks": ["InvertedPendulum-v5"], "algos": ["ppo"], "architectures": ["kama", "mlp"], "seeds": [0],
        "hidden": {"ppo": 8}, "num_rotations": [10], "total_timesteps": 256, "eval_every": 256,
        "eval_episodes": 1, "algo_kwargs": {"ppo": {"n_steps": 128, "batch_size": 64}},
        "angle_gain": [1.0], "plane_sampler": ["iid"], "normalize": [False]}  # the paper's layers, raw environments


def test_expand_and_run_ids():
    runs = expand(load_study_config({**TINY, "num_rotations": [10, 20], "learn_planes": [False, True],
                                     "seeds": [0, 1]}))
    ids = [run_id(r) for r in runs]
    # kama: 2 K x 2 planes x 2 seeds; mlp: 2 seeds
    assert len(runs) == 10 and len(set(ids)) == 10
    assert "InvertedPendulum-v5__ppo__kama-K20-planes__s1" in ids and "InvertedPendulum-v5__ppo__mlp__s0" in ids
    sc = [run_id(r) for r in expand(load_study_config({**TINY, "architectures": ["kama", "toeplitz", "mlp"],
                                                       "structured_critic": True}))]
    assert sc == ["InvertedPendulum-v5__ppo__kama-K10-sc__s0", "InvertedPendulum-v5__ppo__toeplitz-sc__s0",
                  "InvertedPendulum-v5__ppo__mlp__s0"]
    # KAMA-only options leave the baselines' runs as they are in any other study
    swept = expand(load_study_config({**TINY, "architectures": ["kama", "toeplitz", "mlp"],
                                      "angle_gain": ["dense", 1.0], "plane_sampler": ["live"]}))
    base = {run_id(r): r for r in expand(load_study_config({**TINY, "architectures": ["toeplitz", "mlp"]}))}
    others = [r for r in swept if r.architecture != "kama"]
    assert len(others) == 2 and all(r == base[run_id(r)] for r in others)
    assert {(r.angle_gain, r.plane_sampler) for r in swept if r.architecture == "kama"} == {("dense", "live"),
                                                                                            (1.0, "live")}
    # the defaults: live planes, the paper's angle gain, VecNormalize
    assert run_id(RunConfig()) == "InvertedPendulum-v5__ppo__kama-K200-live-vn__s0"
    assert [run_id(r) for r in expand(StudyConfig(architectures=("kama", "mlp"), seeds=(0,)))] == [
        "InvertedPendulum-v5__ppo__kama-K200-live-vn__s0", "InvertedPendulum-v5__ppo__mlp-vn__s0"]


@pytest.mark.parametrize("data, match", [
    ({"taks": ["Hopper-v5"]}, "unknown study config key"),
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"algos": ["sac"]}, "algos must be one of"),
    ({"architectures": ["lowrank"]}, "architectures must be one of"),
    ({"num_rotations": [0]}, "num_rotations must be >= 1"),
    ({"tasks": ["NoSuchEnv-v0"]}, "not a registered gymnasium environment"),
    ({"seeds": [0, 0]}, "seeds must not repeat a value"),
    ({"angle_gain": [1.0, "fast"]}, "angle_gain must be one of"),
    ({"plane_sampler": ["uniform"]}, "plane_sampler must be one of"),
])
def test_bad_study_configs_fail_before_training(data, match):
    with pytest.raises(ValueError, match=match):
        expand(load_study_config({**TINY, **data}))


def test_run_study_skips_finished_and_redoes_unfinished(tmp_path):
    study = load_study_config(TINY)
    folders = run_study(study, tmp_path, workers=1, progress=False)
    assert len(folders) == 2 and all(is_finished(f) for f in folders)
    stamps = {f: (f / "config.json").stat().st_mtime_ns for f in folders}
    # An interrupted run: config.json exists but is not finished, with a stray partial file.
    meta = json.loads((folders[1] / "config.json").read_text())
    meta["finished"] = False
    (folders[1] / "config.json").write_text(json.dumps(meta))
    (folders[1] / "partial.tmp").write_text("half")
    run_study(study, tmp_path, workers=1, progress=False)
    assert (folders[0] / "config.json").stat().st_mtime_ns == stamps[folders[0]]  # not redone
    assert is_finished(folders[1]) and not (folders[1] / "partial.tmp").exists()  # redone from scratch
    assert json.loads((tmp_path / "study.json").read_text())["total_timesteps"] == 256


def test_killed_study_resumes(tmp_path):
    cfg = {**TINY, "architectures": ["mlp"], "seeds": [0, 1, 2], "total_timesteps": 1024, "eval_every": 512}
    path = tmp_path / "study.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "kama.cli", "rl", "study", "--config", str(path), "--out", str(out),
           "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    first = out / "InvertedPendulum-v5__ppo__mlp__s0"
    while time.time() < deadline and not is_finished(first):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert is_finished(first)
    stamp = (first / "config.json").stat().st_mtime_ns
    unfinished = [s for s in (1, 2) if not is_finished(out / f"InvertedPendulum-v5__ppo__mlp__s{s}")]
    assert unfinished, "the study finished before it could be killed"
    assert main(["rl", "study", "--config", str(path), "--out", str(out), "--workers", "1", "--no-progress"]) == 0
    assert all(is_finished(out / f"InvertedPendulum-v5__ppo__mlp__s{s}") for s in (0, 1, 2))
    assert (first / "config.json").stat().st_mtime_ns == stamp


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(x) for x in out.split()}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ps")
def test_pool_workers_exit_when_the_study_process_is_killed(tmp_path):
    cfg = {**TINY, "architectures": ["mlp"], "seeds": [0, 1], "total_timesteps": 100_000, "eval_every": 50_000}
    path = tmp_path / "study.json"
    path.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "kama.cli", "rl", "study", "--config", str(path), "--out", str(tmp_path / "o"),
           "--workers", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    workers: set[int] = set()
    while time.time() < deadline and len(workers) < 2:
        workers = {c for c in _children(proc.pid) if "spawn_main" in open(f"/proc/{c}/cmdline").read()}
        time.sleep(0.2)
    assert workers, "no pool worker started"
    os.kill(proc.pid, signal.SIGKILL)  # only the parent: it cannot shut its pool down
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "pool workers outlived the killed study process"


def test_process_pool_backend(tmp_path):
    folders = run_study(load_study_config(TINY), tmp_path, workers=2, progress=False)
    assert all(is_finished(f) for f in folders)


def test_ray_backend_matches_local(tmp_path):
    pytest.importorskip("ray")
    study = load_study_config({**TINY, "architectures": ["kama"]})
    local = run_study(study, tmp_path / "local", workers=1, progress=False)
    ray_runs = run_study(study, tmp_path / "ray", backend="ray", progress=False)
    for a, b in zip(local, ray_runs, strict=True):
        ra = [line.split(",")[:2] for line in (a / "returns.csv").read_text().splitlines()]
        rb = [line.split(",")[:2] for line in (b / "returns.csv").read_text().splitlines()]
        assert ra == rb and is_finished(b)


def test_cli_study_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"unknown": 1}))
    assert main(["rl", "study", "--config", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "unknown study config key" in capsys.readouterr().err
    assert main(["rl", "study", "--config", str(tmp_path / "missing.json"), "--out", str(tmp_path / "o")]) == 2
    with pytest.raises(ValueError, match="backend must be one of"):
        run_study(StudyConfig(), tmp_path, backend="slurm")


def test_report_from_study_folders(tmp_path):
    study = load_study_config(TINY)
    run_study(study, tmp_path / "s", workers=1, progress=False)
    assert main(["rl", "report", "--study", str(tmp_path / "s"), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "learning_curves.png" in text and "Table 1" in text and "| InvertedPendulum-v5 | ppo | KAMA |" in text
    assert (tmp_path / "r" / "learning_curves.png").stat().st_size > 0
    assert main(["rl", "report", "--study", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")]) == 2
    # a structured-critic study beside it is reported as its own variant
    sc = load_study_config({**TINY, "architectures": ["kama"], "structured_critic": True})
    run_study(sc, tmp_path / "s2", workers=1, progress=False)
    assert main(["rl", "report", "--study", str(tmp_path / "s"), str(tmp_path / "s2"), "--out",
                 str(tmp_path / "r3")]) == 0
    text = (tmp_path / "r3" / "report.md").read_text()
    assert "| InvertedPendulum-v5 | ppo | KAMA (structured critic) | 10 |" in text
    assert "| InvertedPendulum-v5 | ppo | KAMA | 10 |" in text
    assert "| InvertedPendulum-v5 | ppo | unstructured | - | random |" in text and "| 1 |\n" in text
    # the same baseline run listed by both studies counts once
    assert main(["rl", "report", "--study", str(tmp_path / "s"), str(tmp_path / "s"), "--out",
                 str(tmp_path / "r4")]) == 0
    assert "+/- 0.0 | 1 |" in (tmp_path / "r4" / "report.md").read_text()
    # gain, planes and normalization variants are their own rows, each normalized by the MLP of its protocol
    vn = load_study_config({**TINY, "angle_gain": ["dense"], "plane_sampler": ["live"], "normalize": [True]})
    run_study(vn, tmp_path / "s3", workers=1, progress=False)
    assert main(["rl", "report", "--study", str(tmp_path / "s"), str(tmp_path / "s3"), "--out",
                 str(tmp_path / "r5")]) == 0
    text = (tmp_path / "r5" / "report.md").read_text()
    assert "| ppo | KAMA (dense gain, live planes, VecNormalize) | 1 |" in text
    assert "| ppo | unstructured (VecNormalize) | 1 | 1.000 |" in text and "| ppo | unstructured | 1 | 1.000 |" in text


def test_ablation_figures_compare_only_what_varies():
    from kama.experiments.rl_policies import _compared

    keys = [("Hopper", "ppo", "kama", 10, False), ("Hopper", "ppo", "kama", 200, False),
            ("Hopper", "ppo", "kama", 200, True), ("Hopper", "ppo", "mlp", 200, False),
            ("Swimmer", "ppo", "kama", 200, False), ("Swimmer", "trpo", "kama", 100, True)]
    groups = {k: [] for k in keys}
    assert set(_compared(groups, "rotations")) == {keys[0], keys[1]}  # Swimmer ran one K; planes apart
    assert set(_compared(groups, "planes")) == {keys[1], keys[2]}  # only K = 200 on Hopper ran both


def test_a_changed_config_is_refused_naming_the_fields(tmp_path, capsys):
    study = load_study_config(TINY)
    folders = run_study(study, tmp_path, workers=1, progress=False)
    stamps = [(f / "model.zip").stat().st_mtime_ns for f in folders]
    for change, field in [({"total_timesteps": 128, "eval_every": 128}, "total_timesteps: 256 -> 128"),
                          ({"hidden": {"ppo": 4}}, "hidden: 8 -> 4")]:
        with pytest.raises(ValueError, match="made with another config") as info:
            run_study(load_study_config({**TINY, **change}), tmp_path, workers=1, progress=False)
        assert field in str(info.value)
        assert [(f / "model.zip").stat().st_mtime_ns for f in folders] == stamps  # nothing retrained
        assert json.loads((tmp_path / "study.json").read_text())["total_timesteps"] == 256  # not rewritten
    path = tmp_path / "changed.json"
    path.write_text(json.dumps({**TINY, "hidden": {"ppo": 4}}))
    assert main(["rl", "study", "--config", str(path), "--out", str(tmp_path), "--no-progress"]) == 2
    assert "hidden: 8 -> 4" in capsys.readouterr().err
    # an added seed is not a change: the finished runs are kept and the new one trained
    grown = run_study(load_study_config({**TINY, "seeds": [0, 1]}), tmp_path, workers=1, progress=False)
    assert len(grown) == 4 and all(is_finished(f) for f in grown)
    assert [(f / "model.zip").stat().st_mtime_ns for f in folders] == stamps
    # rerun_changed retrains them with the new config
    run_study(load_study_config({**TINY, "hidden": {"ppo": 4}}), tmp_path, workers=1, progress=False,
              rerun_changed=True)
    assert json.loads((folders[0] / "config.json").read_text())["config"]["hidden"] == 4


def _legacy(folder):
    """A run stored before runs recorded the digests of their files (the committed evidence): checked by content."""
    meta = json.loads((folder / "config.json").read_text())
    del meta["outputs"]
    (folder / "config.json").write_text(json.dumps(meta))


def _legacy_garbage_returns(folder):
    _legacy(folder)
    (folder / "returns.csv").write_text("garbage\n1,2\n")


def _legacy_nan_returns(folder):
    _legacy(folder)
    (folder / "returns.csv").write_text("timesteps,mean_return\n0,1.0\n256,nan\n")


def _legacy_short_returns(folder):
    _legacy(folder)
    (folder / "returns.csv").write_text("timesteps,mean_return\n0,1.0\n")


def _legacy_bad_zip(folder):
    _legacy(folder)
    (folder / "model.zip").write_bytes(b"PK not a zip")


@pytest.mark.parametrize("damage, reason", [
    (lambda f: (f / "returns.csv").write_text("garbage\n1,2\n"), "returns.csv changed"),
    (lambda f: (f / "returns.csv").write_text("timesteps,mean_return\n0,nan\n256,nan\n"), "returns.csv"),
    (lambda f: (f / "model.zip").unlink(), "model.zip is missing"),
    (_legacy_garbage_returns, "returns.csv has no evaluation rows"),
    (_legacy_nan_returns, "returns.csv holds a non-finite return"),
    (_legacy_short_returns, "returns.csv ends at step 0 of 256"),
    (_legacy_bad_zip, "model.zip is missing or not a zip file"),
    (lambda f: (f / "model.zip").write_bytes((f / "model.zip").read_bytes()[:100]), "model.zip"),
    (lambda f: (f / "config.json").write_text("{"), "config.json is not valid JSON"),
])
def test_damaged_runs_are_not_finished_are_left_out_of_reports_and_rerun(tmp_path, capsys, damage, reason):
    from kama.rl.study import run_problem

    study = load_study_config(TINY)
    folders = run_study(study, tmp_path / "s", workers=1, progress=False)
    damage(folders[0])
    assert reason in run_problem(folders[0], expand(study)[0])
    assert main(["rl", "report", "--study", str(tmp_path / "s"), "--out", str(tmp_path / "r")]) == 0
    text = (tmp_path / "r" / "report.md").read_text()
    assert "nan" not in text and "1 run(s) not finished yet are left out" in text
    with pytest.warns() as record:
        run_study(study, tmp_path / "s", workers=1, progress=False)
    assert is_finished(folders[0], expand(study)[0])
    if not reason.startswith("config.json"):  # a damaged run's rerun is announced
        assert any("rerunning" in str(w.message) for w in record)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and ps")
def test_sigint_to_the_study_process_alone_stops_queued_runs(tmp_path):
    cfg = {**TINY, "architectures": ["mlp"], "seeds": [0, 1, 2, 3, 4, 5], "total_timesteps": 60_000,
           "eval_every": 30_000}
    path = tmp_path / "study.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "kama.cli", "rl", "study", "--config", str(path), "--out", str(out),
           "--workers", "2", "--no-progress"]
    # a process started with SIGINT ignored (a background job of a non-interactive shell, as CI may run the
    # tests) passes that on to its children, and a Python started so never raises KeyboardInterrupt: the study is
    # started with SIGINT at its default, as from a terminal
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, old)
    deadline = time.time() + 120
    workers: set[int] = set()
    while time.time() < deadline and len(workers) < 2:
        workers = {c for c in _children(proc.pid) if "spawn_main" in open(f"/proc/{c}/cmdline").read()}
        time.sleep(0.2)
    assert workers, "no pool worker started"
    os.kill(proc.pid, signal.SIGINT)  # the parent only, as `kill -INT pid` does
    t0 = time.time()
    _, err = proc.communicate(timeout=60)  # read stderr while waiting: a full pipe would block the study
    assert proc.returncode == 130
    assert time.time() - t0 < 30, "the study went on with its queued runs"
    assert "interrupted" in err
    finished = [s for s in range(6) if is_finished(out / f"InvertedPendulum-v5__ppo__mlp__s{s}")]
    assert len(finished) < 6
    deadline = time.time() + 20
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers)
