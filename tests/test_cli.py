import json
import math
import subprocess
import sys

import numpy as np
import pytest

from pyro_bbb import cli
from test_report import SETTINGS, FakeReport  # the report writer's stand-ins

PROMISED = ["report.md", "report.html", "metrics.json", "predictive_bands.png", "std_ratio.png", "elbo.png",
            "forest.png", "reference_trace.png", "reference_rank.png"]
TINY = ["--epochs", "30", "--warmup", "15", "--samples", "15", "--max-tree-depth", "4", "--hidden", "8",
        "--vi-samples", "100", "--quiet"]


def _finite_numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _finite_numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _finite_numbers(v)
    elif isinstance(obj, float):
        yield obj


@pytest.mark.slow
@pytest.mark.parametrize("reference,sampler", [("hmc", "pyro_bbb ChEES-HMC"), ("nuts", "Pyro NUTS")])
def test_compare_end_to_end_writes_every_promised_file(tmp_path, reference, sampler):
    out = tmp_path / "report"
    # As a user runs it: the command in a fresh process.
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_bbb.cli", "compare", *TINY, "--reference", reference,
         "--chains", "8" if reference == "hmc" else "2", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    for name in PROMISED:
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    numbers = list(_finite_numbers(metrics["table"]))
    assert numbers and all(math.isfinite(v) for v in numbers)
    rows = {(r["section"], r["metric"], r["scope"]) for r in metrics["table"]}
    assert any(metric == "std_ratio_median" for _, metric, _ in rows)
    assert metrics["settings"]["reference"]["sampler"] == sampler
    html = (out / "report.html").read_text()
    assert "<img src='predictive_bands.png'" in html and "<table" in html
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]  # no temporary folder left
    last = proc.stdout.strip().splitlines()[-1]
    assert "report.html" in last and "x the reference's" in last, last


def test_interrupted_run_leaves_the_previous_report_and_no_partial_folder(tmp_path, monkeypatch):
    from pyro_bbb import report as rp

    out = tmp_path / "out"
    rp.write_report(out, FakeReport('x'), SETTINGS)
    before = (out / "report.md").read_text()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(rp, "to_html", boom)
    monkeypatch.setattr(cli, "run_compare",
                        lambda args, written: rp.write_report(args.out, FakeReport('x'), SETTINGS, written=written))
    assert cli.main(["compare", "--out", str(out)]) == 130
    assert (out / "report.md").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("target", [".", "mydata", "README.md"])
def test_out_that_pyro_bbb_did_not_write_is_refused_before_any_work(tmp_path, monkeypatch, capsys, target):
    # The user's folder as it was when `--out .` deleted it: a checkout with files in it.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("readme")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref")
    (tmp_path / "mydata").mkdir()
    (tmp_path / "mydata" / "x.csv").write_text("1,2")
    before = {str(p): p.read_text() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.setattr("pyro_bbb.fit", lambda *a, **k: pytest.fail("work started before --out was checked"))
    assert cli.main(["compare", "--out", target, "--quiet"]) == 2
    assert "--out" in capsys.readouterr().err
    assert {str(p): p.read_text() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_help_answers_without_importing_torch_pyro_or_arviz():
    code = ("import sys, contextlib, io\n"
            "from pyro_bbb import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try: cli.main(['compare', '--help'])\n"
            "    except SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'pyro', 'arviz', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "[]", proc.stderr


def test_help_names_each_default_once_and_no_private_names(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--help"])
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "default: default" not in text
    assert "(default: 1500)" in text and "(default: out)" in text
    for argv in (["compare", "--noise", "x"], ["compare", "--epochs", "x"], ["compare", "--seed", "1.5"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        err = capsys.readouterr().err
        assert "invalid" not in err and "_" not in err.splitlines()[-1].split(":", 2)[-1], err


def test_ctrl_c_during_bbb_writes_no_report(tmp_path, monkeypatch, capsys):
    import pyro_bbb

    real_fit = pyro_bbb.fit

    def fit_then_interrupted(*args, **kwargs):
        history = real_fit(*args, **{**kwargs, "epochs": 2})
        history.interrupted = True  # what fit returns after Ctrl-C
        return history

    monkeypatch.setattr(pyro_bbb, "fit", fit_then_interrupted)
    monkeypatch.setattr(pyro_bbb, "run_hmc", lambda *a, **k: pytest.fail("sampled a partly trained model"))
    out = tmp_path / "out"
    assert cli.main(["compare", "--out", str(out), "--quiet", "--num-data", "20"]) == 130
    assert "during Bayes by Backprop" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["compare", "--epochs", "0"], "--epochs"),
        (["compare", "--pi", "1.5"], "--pi"),
        (["compare", "--dataset", "mnist"], "--dataset"),
        (["compare", "--noise", "-1"], "--noise"),
        (["compare", "--hidden", "a,b"], "--hidden"),
        (["compare", "--methods", "bbb,mcmc"], "--methods"),
    ],
)
def test_bad_options_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert needle in err[-1] and "Traceback" not in "".join(err)


def test_uci_without_data_dir_is_a_clean_error(capsys):
    assert cli.main(["compare", "--dataset", "uci", "--quiet"]) == 2
    assert "--data-dir" in capsys.readouterr().err


@pytest.mark.slow
def test_compare_many_methods_writes_the_fidelity_report_and_readable_posteriors(tmp_path):
    import arviz as az

    out = tmp_path / "out"
    methods = "bbb,lowrank,ensemble,dropout"
    assert cli.main(["compare", *TINY, "--chains", "8", "--methods", methods, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["schemes"]) == methods.split(",")
    assert all(math.isfinite(metrics["schemes"][m]["w1_mean"]) for m in methods.split(","))
    assert "summary" in metrics and metrics["settings"]["methods"] == methods.split(",")
    for name in [*methods.split(","), "reference"]:
        idata = az.from_netcdf(out / f"posterior_{name}.nc")
        assert idata.predictions["f"].shape[-1] == metrics["settings"]["n_test"]
    ens = az.from_netcdf(out / "posterior_ensemble.nc")
    assert ens.posterior.sizes["chain"] == 1  # K members as one chain of K draws
    assert (out / "scheme_bands.png").stat().st_size > 0 and "<table" in (out / "report.html").read_text()


def test_sigterm_during_the_run_exits_130_and_leaves_no_folder(tmp_path):
    # The run is stopped by SIGTERM (as a job scheduler does) while it trains.
    import signal
    import time

    started = tmp_path / "started"
    code = (
        "import sys, time, pathlib, pyro_bbb\n"
        "from pyro_bbb import cli\n"
        "def slow_fit(*a, **k):\n"
        f"    pathlib.Path({str(started)!r}).write_text('x')\n"
        "    time.sleep(60)\n"
        "pyro_bbb.fit = slow_fit\n"
        f"sys.exit(cli.main(['compare', '--quiet', '--out', {str(tmp_path / 'out')!r}]))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not started.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert started.exists(), proc.stderr.read() if proc.poll() is not None else "never started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    assert "no report was written" in proc.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["started"]


def _uci_folder(tmp_path, rng, n=30):
    """A tiny data set in the UCI layout: inputs in columns 0, 1, 3 (so index_features matters),
    the target in column 2, every value distinct."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    raw = rng.uniform(-2.0, 2.0, size=(n, 4))
    raw[:, 2] = np.sin(raw[:, 0]) + 0.5 * raw[:, 3] + 0.1 * rng.standard_normal(n)
    np.savetxt(folder / "data.txt", raw)
    (folder / "index_features.txt").write_text("0\n1\n3\n")
    (folder / "index_target.txt").write_text("2\n")
    return folder, raw, [0, 1, 3], 2


@pytest.mark.parametrize("split", ["3", "17"])
def test_uci_gap_split_out_of_range_is_one_line_exit_2_naming_the_range(tmp_path, capsys, split):
    folder, *_ = _uci_folder(tmp_path, np.random.default_rng(0))
    out = tmp_path / "out"
    assert cli.main(["compare", "--dataset", "uci-gap", "--data-dir", str(folder), "--split", split,
                     "--quiet", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--split {split}" in err[0] and "0..2" in err[0], err
    assert not out.exists()


def test_uci_gap_without_data_dir_is_a_clean_error(capsys):
    assert cli.main(["compare", "--dataset", "uci-gap", "--quiet"]) == 2
    assert "--data-dir" in capsys.readouterr().err


def test_uci_gap_holds_out_the_middle_third_of_the_feature_and_all_of_it_is_away(tmp_path):
    folder, raw, features, target = _uci_folder(tmp_path, np.random.default_rng(1))
    k = 2  # the third input feature: raw column 3
    out = tmp_path / "out"
    args = cli.build_parser().parse_args(
        ["compare", "--dataset", "uci-gap", "--data-dir", str(folder), "--split", str(k), *TINY,
         "--chains", "4", "--max-leapfrog-steps", "20", "--out", str(out)])
    report = cli.run_compare(args)

    # The rule, from the raw file: rows sorted by the feature, the middle third is the test set.
    n = len(raw)
    ranked = np.argsort(raw[:, features[k]])
    test_rows = np.sort(ranked[n // 3: n - n // 3])
    train_rows = np.setdiff1d(np.arange(n), test_rows)
    assert raw[ranked[: n // 3], features[k]].max() < raw[test_rows, features[k]].min()
    assert raw[test_rows, features[k]].max() < raw[ranked[n - n // 3:], features[k]].min()
    x = raw[:, features]
    expected = (x[test_rows] - x[train_rows].mean(0)) / x[train_rows].std(0)  # standardized on training rows
    y = raw[:, target]
    expected_y = (y[test_rows] - y[train_rows].mean()) / y[train_rows].std()
    for idata in (report.vi, report.hmc):
        np.testing.assert_allclose(idata.predictions_constant_data["x"].values, expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(idata.predictions_constant_data["y"].values, expected_y, rtol=0, atol=1e-5)
        assert idata.constant_data["x"].shape[0] == len(train_rows)

    assert not report.per_input.in_data.any()  # the gap is away from the data, all of it
    assert report.get("num_inputs", "away") == len(test_rows) and report.get("num_inputs", "in_data") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["in_data"] for r in metrics["per_input"]] == [False] * len(test_rows)
    assert metrics["settings"]["n_test"] == len(test_rows) and "gap split on input feature 2" in \
        metrics["settings"]["dataset"]
