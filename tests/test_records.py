"""Stored results are validated on reuse: ``kama reproduce`` units and outputs, folder locks, config checks, and
the one-line errors of the command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kama.cli import main
from kama.experiments.base import RunContext
from kama.records import (
    LOCK_NAME,
    FolderBusyError,
    FolderLock,
    StaleResultWarning,
    check_manifest,
    content_hash,
    file_manifest,
    git_commit,
    provenance,
)

TINY = ["--only", "capacity", "--set", "capacity.walks=200", "--set", "capacity.dims=[8]",
        "--set", "capacity.ratios=[0.5, 2]", "--set", "capacity.fit_ratios=[1, 4]", "--set", "capacity.fit_steps=50"]


def _run(out, *extra: str) -> int:
    return main(["reproduce", "--quick", "--out", str(out), "--no-progress", *TINY, *extra])


def _csv_rows(path) -> int:
    return len(path.read_text().splitlines()) - 1


def test_provenance_names_the_cpu():
    from kama.ops.machine import describe

    prov = provenance()
    assert prov["cpu"] == describe().summary() and describe().model in prov["cpu"]
    assert {"kama_version", "git_commit", "torch", "python", "machine", "cpus", "time_utc"} <= set(prov)


def test_git_commit_is_the_codes_not_the_working_directorys(tmp_path, monkeypatch):
    """A study run from another checkout (say, with a worktree's code) records the commit of the code that ran."""
    import shutil

    import kama

    if shutil.which("git") is None:
        pytest.skip("needs git")
    here = Path(kama.__file__).resolve().parent
    code = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True)
    other = tmp_path / "other"
    other.mkdir()
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["init", "-q"], ["commit", "-q", "--allow-empty", "-m", "x"]):
        subprocess.run(["git", *cmd], cwd=other, check=True, env={**os.environ, **env})
    theirs = subprocess.run(["git", "rev-parse", "HEAD"], cwd=other, capture_output=True, text=True).stdout.strip()
    monkeypatch.chdir(other)
    got = git_commit()
    assert not got.startswith(theirs)
    if code.returncode == 0:  # an editable install: the checkout of the package
        assert got.removesuffix("+dirty") == code.stdout.strip()
    else:  # an installed copy: no commit to name
        assert got == "unknown"


def test_a_change_to_an_ignored_output_leaves_the_commit_clean(tmp_path):
    """A benchmark script's earlier table (a change to BENCHMARKS.md) does not mark the code's commit dirty; a change
    to any other tracked file, in the root or below it, does."""
    import shutil

    from kama.records import _commit_of

    if shutil.which("git") is None:
        pytest.skip("needs git")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    (tmp_path / "src").mkdir()
    for name in ("BENCHMARKS.md", "code.py", "src/mod.py"):
        (tmp_path / name).write_text("a\n")
    for cmd in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "x"]):
        subprocess.run(["git", *cmd], cwd=tmp_path, check=True, env=env)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "BENCHMARKS.md").write_text("b\n")
    (tmp_path / "new.txt").write_text("untracked\n")
    where = tmp_path / "src"  # asked from below the root, as the package's directory is
    assert _commit_of(where, ignore=("BENCHMARKS.md",)) == head
    assert _commit_of(where) == head + "+dirty"
    (tmp_path / "code.py").write_text("b\n")
    assert _commit_of(where, ignore=("BENCHMARKS.md",)) == head + "+dirty"
    subprocess.run(["git", "checkout", "-q", "code.py"], cwd=tmp_path, check=True)
    (tmp_path / "src" / "mod.py").write_text("b\n")
    assert _commit_of(where, ignore=("BENCHMARKS.md",)) == head + "+dirty"


def test_truncated_or_garbage_outputs_are_recomputed(tmp_path):
    out = tmp_path / "r"
    assert _run(out) == 0
    mixing = out / "capacity" / "capacity_mixing.csv"
    good = mixing.read_text()
    mixing.write_text(good[: len(good) // 2])
    with pytest.warns(StaleResultWarning, match="capacity_mixing.csv changed"):
        assert _run(out) == 0
    assert mixing.read_text() == good  # rewritten from the stored units
    assert "3 stored units reused" in (out / "report.md").read_text()
    (out / "capacity" / "capacity.png").unlink()
    with pytest.warns(StaleResultWarning, match="capacity.png is missing"):
        assert _run(out) == 0
    assert (out / "capacity" / "capacity.png").stat().st_size > 0


@pytest.mark.parametrize("content", ["[]", "{not json", '{"format": 1}', "null", ""])
def test_a_unit_of_the_wrong_kind_is_recomputed(tmp_path, content):
    out = tmp_path / "r"
    assert _run(out) == 0
    rows = _csv_rows(out / "capacity" / "capacity_mixing.csv")
    (out / "capacity" / "done.json").unlink()
    (out / "capacity" / "units" / "mixing_d8.json").write_text(content)
    with pytest.warns(StaleResultWarning, match="recomputing .*mixing_d8.json"):
        assert _run(out) == 0
    assert _csv_rows(out / "capacity" / "capacity_mixing.csv") == rows  # no row silently dropped
    assert "2 stored units reused" in (out / "report.md").read_text()


def test_a_unit_of_another_config_or_edited_value_is_recomputed(tmp_path):
    ctx = RunContext(out_dir=tmp_path, config_hash="a")
    assert ctx.unit("u", lambda: [1, 2]) == [1, 2]
    other = RunContext(out_dir=tmp_path, config_hash="b")
    with pytest.warns(StaleResultWarning, match="another config"):
        assert other.unit("u", lambda: [3]) == [3]
    stored = json.loads((tmp_path / "units" / "u.json").read_text())
    stored["value"] = [4]  # edited by hand: the digest no longer matches
    (tmp_path / "units" / "u.json").write_text(json.dumps(stored))
    with pytest.warns(StaleResultWarning, match="does not match its digest"):
        assert other.unit("u", lambda: [5]) == [5]
    assert other.unit("u", lambda: [6]) == [5]
    renamed = RunContext(out_dir=tmp_path, config_hash="b")
    (tmp_path / "units" / "v.json").write_text((tmp_path / "units" / "u.json").read_text())
    with pytest.warns(StaleResultWarning, match="it is unit 'u'"):
        assert renamed.unit("v", lambda: [7]) == [7]


@pytest.mark.parametrize("name, content", [("config.json", "{oops"), ("config.json", "[]"), ("done.json", "[1]"),
                                           ("done.json", "{broken")])
def test_corrupt_records_do_not_block_a_rerun(tmp_path, name, content):
    out = tmp_path / "r"
    assert _run(out) == 0
    (out / "capacity" / name).write_text(content)
    with pytest.warns(StaleResultWarning):
        assert _run(out) == 0
    assert json.loads((out / "capacity" / "done.json").read_text())["config_hash"]
    assert _run(out) == 0  # and the next run reuses it
    assert "reused (finished earlier" in (out / "report.md").read_text()


def test_a_changed_config_recomputes_without_warnings(tmp_path, recwarn):
    out = tmp_path / "r"
    assert _run(out) == 0
    assert _run(out, "--set", "capacity.fit_steps=60") == 0
    assert "0 stored units reused" in (out / "report.md").read_text()
    done = json.loads((out / "capacity" / "done.json").read_text())
    assert done["config"]["fit_steps"] == 60
    assert not [w for w in recwarn if issubclass(w.category, StaleResultWarning)]


def test_a_second_writer_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from kama.records import FolderLock; "
                               f"FolderLock({str(out)!r}, 'a test writer').acquire(); print('held', flush=True); "
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _run(out) == 2
        err = capsys.readouterr().err
        assert f"is being written by a test writer (pid {holder.pid}" in err and err.count("\n") == 1
        assert not (out / "capacity").exists()  # nothing was written
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(StaleResultWarning, match="no longer runs"):  # the dead owner's lock is taken over
        assert _run(out) == 0
    assert not (out / LOCK_NAME).exists()


def test_folder_lock_is_exclusive_and_released(tmp_path):
    with FolderLock(tmp_path, "first"):
        with pytest.raises(FolderBusyError, match="being written by first"):
            FolderLock(tmp_path, "second").acquire()
    assert not (tmp_path / LOCK_NAME).exists()
    (tmp_path / LOCK_NAME).write_text("not json")  # unreadable: taken over
    with pytest.warns(StaleResultWarning):
        with FolderLock(tmp_path, "third"):
            assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_concurrent_writers_never_interleave(tmp_path):
    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "kama.cli", "reproduce", "--quick", "--out", str(out), "--no-progress", *TINY[:-2]]
    procs = [subprocess.Popen([*cmd, "--set", f"capacity.fit_steps={steps}"], stderr=subprocess.PIPE, text=True)
             for steps in (90, 30)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(c for c, _ in results)
    assert codes[0] == 0 and codes[1] in (0, 2)
    if codes[1] == 2:
        assert any("is being written by kama reproduce" in err for _, err in results)
    done = json.loads((out / "capacity" / "done.json").read_text())
    fit = (out / "capacity" / "capacity_fit.csv").read_text().splitlines()
    steps = {line.split(",")[-1] for line in fit[1:]}
    assert steps == {str(done["config"]["fit_steps"])}  # the CSV is the run that done.json describes
    time.sleep(0.01)


def test_manifest_and_hash_helpers(tmp_path):
    (tmp_path / "a").write_text("x")
    m = file_manifest(tmp_path, ["a"])
    assert check_manifest(tmp_path, m) is None
    (tmp_path / "a").write_text("y")
    assert "changed" in check_manifest(tmp_path, m)
    assert "no list" in check_manifest(tmp_path, {})
    assert content_hash([1, {"b": 2, "a": 1}]) == content_hash([1, {"a": 1, "b": 2}])


@pytest.mark.parametrize("setting, message", [
    ("capacity.walks=0", "capacity.walks must be >= 2, got 0"),
    ("capacity.walks=-5", "capacity.walks must be >= 2, got -5"),
    ("capacity.walks=50.0", "capacity.walks must be an int"),
    ('capacity.dims=["a"]', "capacity.dims (each entry) must be an int"),
    ("capacity.ratios=[-1]", "capacity.ratios (each entry) must be > 0.0"),
    ("capacity.fit_lr=-1", "capacity.fit_lr must be > 0.0"),
    ("capacity.seed=true", "capacity.seed must be a number"),
    ('kernel_approx.datasets=["mnist"]', "kernel_approx.datasets (each entry) must be one of"),
    ("kernel_approx.standardize=1", "kernel_approx.standardize must be true or false"),
    ("png_gap.angle=4", "png_gap.angle must be <= 3.14"),
    ('png_gap.functions=["sign", "sign"]', "png_gap.functions must not repeat"),
    ("manifold.d=1", "manifold.d must be >= 2"),
    ('rl.study={"hidden": 64}', "rl.study: hidden must be a mapping"),
    ('rl.study={"structured_critic": "false"}', "rl.study: structured_critic must be true or false"),
    ('rl.study={"learn_planes": ["no"]}', "rl.study: learn_planes must be a list of bool"),
    ('rl.study={"algo_kwargs": {"ppo": {"n_steps": 0}}}', "algo_kwargs['n_steps'] must be >= 2"),
    ('rl.study={"algo_kwargs": {"ppo": []}}', "rl.study: algo_kwargs must be a mapping"),
    ('rl.study={"tasks": ["Nope-v0"]}', "rl.study: env_id 'Nope-v0' is not a registered"),
    ("rl.workers=-1", "rl.workers must be >= 0"),
    ('es.es={"sigma": -1}', "es.es: sigma must be a positive number"),
    ('es.es={"seed": 3}', "es.es cannot set ['seed']"),
    ('es.env_id="CartPole-v1"', "es.env_id: action space must be a 1-D"),
])
def test_every_config_field_is_checked_before_any_work(tmp_path, capsys, setting, message):
    pytest.importorskip("stable_baselines3")
    exp = setting.split(".")[0]
    assert main(["reproduce", "--only", exp, "--set", setting, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("kama: error:") and err.count("\n") == 1
    assert not (tmp_path / "o" / exp).exists()


@pytest.mark.parametrize("make_out", [
    lambda tmp: tmp / "a_file",
    lambda tmp: tmp / "a_file" / "below",
    lambda tmp: "/proc/kama-results",
])
def test_out_problems_are_one_line_errors(tmp_path, capsys, make_out):
    (tmp_path / "a_file").write_text("x")
    out = make_out(tmp_path)
    assert main(["reproduce", "--out", str(out), "--no-progress", *TINY]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kama: error:") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_out_is_a_one_line_error(tmp_path, capsys):  # pragma: no cover - CI runs as root
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    assert main(["reproduce", "--out", str(ro / "x"), "--no-progress", *TINY]) == 2
    assert capsys.readouterr().err.startswith("kama: error:")
