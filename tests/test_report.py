"""The report folder's writer: it replaces only what it wrote, and survives being killed at any step."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pyro_bbb import report as rp

SETTINGS = {
    "command": None, "dataset": "toy", "task": "regression", "n_train": 3, "n_test": 2,
    "network": "1-1", "prior": "N(0, 1)", "noise": 0.1,
    "bbb": {"epochs": 1, "lr": 0.1, "particles": 1, "kl": "mc", "kl_weighting": "uniform", "seconds": 0.0},
    "reference": {"sampler": "fake", "num_chains": 1, "warmup_steps": 1, "num_samples": 1,
                  "target_accept_prob": 0.8, "seconds": 0.0},
    "seed": 0, "versions": {"python": "3"},
}


class FakeReport:
    """What the writer reads of a ComparisonReport; ``tag`` tells two reports apart."""

    def __init__(self, tag):
        self.tag = tag
        self.warnings = []
        self.table = pd.DataFrame({"metric": ["m"], "value": [1.0]})
        self.weight_space = pd.DataFrame({"site": ["w"]})

    def plot(self, folder):
        (Path(folder) / "a.png").write_bytes(b"png")
        return [Path(folder) / "a.png"]

    def to_dict(self):
        return {"tag": self.tag}

    def to_markdown(self):
        return f"# title\n{self.tag}\n"


def tag_of(folder: Path) -> str:
    return json.loads((folder / "metrics.json").read_text())["tag"]


def assert_complete(folder: Path):
    listed = json.loads((folder / rp.MARKER).read_text())
    assert sorted(listed) == ["a.png", "metrics.json", "report.html", "report.md"]
    assert {p.name for p in folder.iterdir()} == set(listed) | {rp.MARKER}


def test_writes_a_new_folder_then_replaces_its_own_report(tmp_path):
    out = tmp_path / "out"
    assert rp.write_report(out, FakeReport("first"), SETTINGS) == out
    assert_complete(out)
    rp.write_report(out, FakeReport("second"), SETTINGS)
    assert tag_of(out) == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left


def test_an_empty_folder_is_used(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    rp.write_report(out, FakeReport("x"), SETTINGS)
    assert_complete(out)


@pytest.mark.parametrize("kind", ["user folder", "file", "symlink"])
def test_refuses_what_it_did_not_write_and_touches_nothing(tmp_path, kind):
    out = tmp_path / "target"
    if kind == "user folder":
        out.mkdir()
        (out / "data.csv").write_text("precious")
    elif kind == "file":
        out.write_text("precious")
    else:
        (tmp_path / "real").mkdir()
        out.symlink_to(tmp_path / "real")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    with pytest.raises(rp.OutputFolderError, match="--out"):
        rp.write_report(out, FakeReport("x"), SETTINGS)
    with pytest.raises(rp.OutputFolderError):  # --force never covers a folder it did not write
        rp.write_report(out, FakeReport("x"), SETTINGS, force=True)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    if kind != "symlink":
        assert (out / "data.csv" if kind == "user folder" else out).read_text() == "precious"


def test_refuses_the_current_folder_and_its_parents(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    rp.write_report(work, FakeReport("x"), SETTINGS)  # even a report folder, once we stand in it
    monkeypatch.chdir(work)
    for out in (".", "..", str(work)):
        with pytest.raises(rp.OutputFolderError, match="current folder"):
            rp.check_out(out, force=True)
    assert_complete(work)


def test_a_report_with_added_files_needs_force(tmp_path):
    out = tmp_path / "out"
    rp.write_report(out, FakeReport("first"), SETTINGS)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(rp.OutputFolderError, match="notes.txt"):
        rp.write_report(out, FakeReport("second"), SETTINGS)
    assert (out / "notes.txt").read_text() == "mine" and tag_of(out) == "first"
    rp.write_report(out, FakeReport("second"), SETTINGS, force=True)
    assert tag_of(out) == "second"


# -- killed at each step ------------------------------------------------------------------------
# The writer's file-system operations, counted; the child process dies (os._exit: no clean-up, as
# under SIGKILL) at operation k.  Every k from 1 until a run completes is tried.
CHILD = textwrap.dedent("""
    import os, shutil, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_report import FakeReport, SETTINGS
    from pyro_bbb import report as rp

    crash_at, count = int(sys.argv[1]), [0]
    def counted(fn):
        def wrapper(*a, **k):
            count[0] += 1
            if count[0] == crash_at:
                os._exit(9)
            return fn(*a, **k)
        return wrapper
    Path.rename = counted(Path.rename)
    Path.write_text = counted(Path.write_text)
    Path.write_bytes = counted(Path.write_bytes)
    rp.shutil.rmtree = counted(shutil.rmtree)
    rp.write_report(sys.argv[2], FakeReport("new"), SETTINGS)
""")


def test_killed_at_any_step_the_next_run_recovers(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    steps = 0
    for crash_at in range(1, 40):
        base = tmp_path / f"k{crash_at}"
        base.mkdir()
        out = base / "out"
        rp.write_report(out, FakeReport("old"), SETTINGS)
        proc = subprocess.run([sys.executable, str(script), str(crash_at), str(out)], capture_output=True, text=True)
        if proc.returncode == 0:
            break
        assert proc.returncode == 9, proc.stderr
        steps += 1
        rp.check_out(out)  # what the next run does first
        assert_complete(out)
        assert tag_of(out) in ("old", "new")  # the previous report, or the new one once it was in place
        assert [p.name for p in base.iterdir()] == ["out"], f"left behind after a kill at step {crash_at}"
    else:
        pytest.fail("the writer never completed")
    assert steps >= 8  # marker, 4 files, marker again, 2 renames, removal of the old one
    assert tag_of(out) == "new"


def test_sigint_at_any_step_leaves_a_complete_report_and_says_whether_it_is_new(tmp_path, monkeypatch):
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # test runners may replace it
    try:
        _interrupt_at_each_step(tmp_path, monkeypatch)
    finally:
        signal.signal(signal.SIGINT, previous)


def _interrupt_at_each_step(tmp_path, monkeypatch):
    real_rename, real_write = Path.rename, Path.write_text
    outcomes = set()
    for interrupt_at in range(1, 40):
        count = [0]

        def counted(fn):
            def wrapper(*a, **k):
                count[0] += 1
                if count[0] == interrupt_at:
                    os.kill(os.getpid(), signal.SIGINT)
                return fn(*a, **k)
            return wrapper

        base = tmp_path / f"i{interrupt_at}"
        base.mkdir()
        out = base / "out"
        rp.write_report(out, FakeReport("old"), SETTINGS)
        monkeypatch.setattr(Path, "rename", counted(real_rename))
        monkeypatch.setattr(Path, "write_text", counted(real_write))
        written = []
        try:
            rp.write_report(out, FakeReport("new"), SETTINGS, written=written)
            interrupted = False
        except KeyboardInterrupt:
            interrupted = True
        finally:
            monkeypatch.setattr(Path, "rename", real_rename)
            monkeypatch.setattr(Path, "write_text", real_write)
        assert_complete(out)
        assert tag_of(out) == ("new" if written else "old")  # `written` tells the truth
        assert [p.name for p in base.iterdir()] == ["out"]
        outcomes.add((interrupted, bool(written)))
        if not interrupted:
            break
    # interrupted before the swap (old kept), interrupted in the swap (held until the new one is in)
    assert outcomes == {(True, False), (True, True), (False, True)}


def test_recover_leaves_other_runs_and_unmarked_folders_alone(tmp_path):
    out = tmp_path / "out"
    live = tmp_path / f".out.partial-{os.getppid()}-abc"  # a process that is running
    live.mkdir()
    (live / rp.MARKER).write_text("[]")
    foreign = tmp_path / ".out.old-1234567"  # named like ours, not ours: no marker
    foreign.mkdir()
    (foreign / "x").write_text("keep")
    assert rp.recover(out) == []
    assert live.is_dir() and (foreign / "x").read_text() == "keep"


# ----------------------------------------------------------------------------
# The reference's chains: ArviZ trace and rank plots in the report folder
# ----------------------------------------------------------------------------
def _comparison_with_learned_noise(rng):
    """A real ComparisonReport whose reference has two chains and a learned noise std."""
    from test_fidelity import X_TEST, _reference, _scheme

    from pyro_bbb.compare import compare

    hmc = _reference(rng, 400)
    hmc.posterior["noise"] = (("chain", "draw"), np.exp(0.1 * rng.standard_normal((2, 200))))
    return compare(_scheme(rng, 0.7, n=300), hmc), hmc, X_TEST


def test_reference_quantities_are_the_noise_and_f_at_spread_test_inputs():
    from pyro_bbb.compare import reference_chain_quantities

    _, hmc, x_test = _comparison_with_learned_noise(np.random.default_rng(3))
    got = reference_chain_quantities(hmc)
    order = np.argsort(x_test[:, 0])  # leftmost, middle and rightmost test input
    picks = [order[0], order[len(order) // 2], order[-1]]
    assert list(got) == ["noise"] + [f"f(x*[{i}])" for i in picks]
    np.testing.assert_array_equal(got["noise"], hmc.posterior["noise"].values)
    for i in picks:
        np.testing.assert_array_equal(got[f"f(x*[{i}])"], hmc.predictions["f"].values[:, :, i])
    assert not any(name.startswith("w") for name in got)  # never a weight


def test_report_folder_shows_the_reference_trace_and_rank_plots(tmp_path):
    import matplotlib.image as mpimg
    import matplotlib.pyplot as plt

    report, _, _ = _comparison_with_learned_noise(np.random.default_rng(4))
    mine = plt.figure()  # the caller's pyplot figure stays current and alone
    out = rp.write_report(tmp_path / "out", report, SETTINGS)
    assert plt.get_fignums() == [mine.number] and plt.gcf() is mine
    plt.close(mine)
    listed = json.loads((out / rp.MARKER).read_text())
    html = (out / "report.html").read_text()
    md = (out / "report.md").read_text()
    for name in ("reference_trace.png", "reference_rank.png"):
        assert name in listed
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = mpimg.imread(out / name).shape[:2]
        assert 200 <= height <= 3000 and 300 <= width <= 3000, (name, height, width)
        assert f"<img src='{name}'" in html and f"![{name}]({name})" in md
    for text in (html, md):
        assert "Reference chains" in text and "chains should overlap" in text and "should be flat" in text
    assert {p.name for p in out.iterdir()} == set(listed) | {rp.MARKER}  # no temporary file left


def test_no_chain_plots_for_a_report_without_a_reference(tmp_path):
    out = rp.write_report(tmp_path / "out", FakeReport("x"), SETTINGS)
    assert "Reference chains" not in (out / "report.html").read_text()
    assert_complete(out)
