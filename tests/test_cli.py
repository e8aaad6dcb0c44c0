import json
import math
import subprocess
import sys

import pytest

from pyro_bbb import cli

PROMISED = ["report.md", "report.html", "metrics.json", "predictive_bands.png", "std_ratio.png", "elbo.png", "forest.png"]
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
    assert not list(tmp_path.glob(".report.partial-*"))  # the temporary folder is gone


def test_interrupted_run_leaves_no_report(tmp_path, monkeypatch):
    out = tmp_path / "out"

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_markdown", boom)
    monkeypatch.setattr(cli, "run_compare", lambda args: cli._write_report(args.out, _FakeReport(), _SETTINGS, None, None))
    assert cli.main(["compare", "--out", str(out)]) == 130
    assert not out.exists()
    assert not list(tmp_path.iterdir())


class _FakeReport:
    warnings = []

    def plot(self, folder):
        (folder / "a.png").write_bytes(b"png")
        return [folder / "a.png"]

    def to_dict(self):
        return {"table": []}


_SETTINGS = {"command": None}


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["compare", "--epochs", "0"], "--epochs"),
        (["compare", "--pi", "1.5"], "--pi"),
        (["compare", "--dataset", "mnist"], "--dataset"),
        (["compare", "--noise", "-1"], "--noise"),
        (["compare", "--hidden", "a,b"], "--hidden"),
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
