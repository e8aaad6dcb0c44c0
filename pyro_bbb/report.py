"""The report folder: its Markdown, HTML and JSON, and the one writer that puts it in place.

A report folder is recognised by its marker file, ``.pyro-bbb-report``, a JSON list
of the files the writer put there.  The writer replaces a folder at ``out`` only
when that folder carries the marker and holds nothing else (``force=True`` also
replaces a marked folder that the user added files to, never an unmarked one), so
``--out .`` or ``--out mydata`` is refused before any work is done.

Writing is crash-safe.  The report is written into ``.NAME.partial-PID-XXXX``
beside ``out``, marked, and swapped in by two renames (``out`` to
``.NAME.old-PID``, the new folder to ``out``), with SIGINT and SIGTERM held back
during the swap.  A run that was killed at any step leaves folders that the next
run (:func:`recover`, called by :func:`check_out`) puts right: a previous report
hidden as ``.NAME.old-PID`` goes back to ``out`` if ``out`` is missing and is
removed otherwise; a partial folder of a process that is no longer running is
removed.  Only folders that carry the marker are ever removed.

Examples
--------
>>> out = check_out("report")                                   # doctest: +SKIP
>>> write_report(out, comparison, settings)                     # doctest: +SKIP
PosixPath('/home/me/report')
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

__all__ = ["MARKER", "OutputFolderError", "check_out", "recover", "write_report", "headline"]

MARKER = ".pyro-bbb-report"
_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class OutputFolderError(ValueError):
    """``out`` is a path the writer may not replace (it did not write it)."""


def _marked(folder: Path) -> list[str] | None:
    """The files listed by the marker of ``folder``; None if it carries none."""
    try:
        names = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return names if isinstance(names, list) else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def recover(out: Path) -> list[str]:
    """Put right what an interrupted writer left beside ``out``; return what was done.

    Only folders named like the writer's own that carry the marker are touched."""
    out = Path(out).absolute()
    done = []
    if not out.parent.is_dir():
        return done
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(old|partial)-(\d+)(-.*)?$")
    for path in sorted(out.parent.iterdir()):
        match = pattern.match(path.name)
        if not match or path.is_symlink() or not path.is_dir():
            continue
        kind, pid = match.group(1), int(match.group(2))
        if pid != os.getpid() and _pid_alive(pid):
            continue  # another run is writing right now
        if _marked(path) is None:
            if not any(path.iterdir()):
                path.rmdir()  # made, killed before its marker: empty
            continue
        if kind == "old" and not out.exists():
            path.rename(out)
            done.append(f"restored the previous report from {path.name}")
        else:
            shutil.rmtree(path)
            done.append(f"removed {path.name}, left by an interrupted run")
    return done


def check_out(out, force: bool = False) -> Path:
    """``out`` as an absolute path the writer may replace, or an OutputFolderError.

    Call it before the work, so a refused ``out`` costs nothing.  It first puts right
    what an interrupted run left (see :func:`recover`)."""
    out = Path(out).absolute()
    if out.is_symlink():
        raise OutputFolderError(f"--out {out} is a symbolic link; give the folder itself")
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out {out} exists and is not a folder; it is left as it is")
    cwd = Path.cwd().resolve()
    if out.resolve() == cwd or out.resolve() in cwd.parents:
        raise OutputFolderError(f"--out {out} is the current folder or holds it; give a new folder, e.g. out/")
    recover(out)
    if out.is_dir():
        listed = _marked(out)
        present = {p.name for p in out.iterdir()}
        if listed is None and present:
            raise OutputFolderError(
                f"--out {out} is a folder that pyro-bbb did not write (no {MARKER} in it); "
                "it is left as it is: give a new or empty folder, or a previous report folder")
        extra = sorted(present - set(listed or []) - {MARKER})
        if extra and not force:
            raise OutputFolderError(
                f"--out {out} is a previous report, but holds files it did not write: "
                f"{', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}; move them, or pass --force "
                "to replace the report with them")
    return out


@contextmanager
def _signals_held():
    """SIGINT and SIGTERM wait until the block is done, then act as they would have.

    Python-level handlers, not a thread's signal mask: a signal may land on any thread
    (BLAS, OpenMP), but its Python handler always runs in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set from the main thread
        return
    caught = []
    previous = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in _HELD_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in caught:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)  # e.g. KeyboardInterrupt for SIGINT
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def _swap_in(tmp: Path, out: Path, written: list | None) -> None:
    """Two renames with the signals held; an empty unmarked ``out`` is removed, never a full one.
    ``written`` gets ``out`` before the signals are let through."""
    with _signals_held():
        if out.exists() and _marked(out) is None:
            out.rmdir()  # check_out let it through only empty; rmdir fails otherwise
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        if written is not None:
            written.append(out)


def write_report(out, report, settings: dict, *, force: bool = False, written: list | None = None,
                 posteriors: dict | None = None) -> Path:
    """Write the report folder at ``out`` atomically; return its path.

    ``report`` is a :class:`pyro_bbb.compare.ComparisonReport` (one scheme) or a
    :class:`pyro_bbb.fidelity.FidelityReport` (many), ``settings`` the run's settings (a
    JSON-ready dict).  ``posteriors`` (name -> arviz.InferenceData), if given, are saved
    as ``posterior_NAME.nc``, which ``arviz.from_netcdf`` reads back.  ``written``, if
    given, gets the path appended the moment the new folder is in place, so a caller
    interrupted just after the swap knows the report exists."""
    out = check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the report is not
        (tmp / MARKER).write_text("[]")  # ours from the start: recover() may remove it
        pictures = [Path(p).name for p in report.plot(tmp) + _plot_reference(report, tmp)]
        metrics = {"settings": settings, **report.to_dict()}
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_jsonable))
        (tmp / "report.md").write_text(to_markdown(report, settings, pictures))
        (tmp / "report.html").write_text(to_html(report, settings, pictures))
        for name, idata in (posteriors or {}).items():
            idata.to_netcdf(str(tmp / f"posterior_{name}.nc"))
        names = sorted(p.name for p in tmp.iterdir() if p.name != MARKER)
        (tmp / MARKER).write_text(json.dumps(names))
        _swap_in(tmp, out, written)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _plot_reference(report, folder: Path) -> list[Path]:
    """The reference's trace and rank plots, for one scheme's report or many schemes' (which
    share one reference)."""
    from .compare import plot_reference_chains

    reports = getattr(report, "reports", None)  # a FidelityReport: scheme -> ComparisonReport
    first = next(iter(reports.values()), None) if reports else report
    return plot_reference_chains(getattr(first, "hmc", None), folder)


def headline(report) -> str:
    """One line with the comparison's main number and the reference's verdict."""
    if hasattr(report, "summary"):  # many schemes: the summary's first sentence says it
        return ". ".join(report.summary().split(". ")[:2]).rstrip(".")  # the verdict, then the closest
    parts = []
    for scope, where in (("away", "away from the data"), ("in_data", "in the data")):
        try:
            ratio = report.get("std_ratio_median", scope)
        except KeyError:
            continue
        if ratio == ratio:  # NaN where no test input lies there
            parts.append(f"BBB's predictive std is {ratio:.2f}x the reference's {where} (median)")
            break
    lost = [w for w in report.warnings if str(w).startswith("the HMC reference is not converged")]
    parts.append("the reference is NOT converged (see the report)" if lost else "the reference passed its convergence check")
    return "; ".join(parts)


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def settings_lines(settings: dict) -> list[str]:
    """The run's settings as Markdown list items."""
    ref = settings["reference"]
    bbb = settings["bbb"]
    methods = settings.get("methods") or ["bbb"]
    lines = [
        f"- data: {settings['dataset']} ({settings['task']}), {settings['n_train']} training points, "
        f"{settings['n_test']} test inputs",
        f"- model: {settings['network']} network, prior {settings['prior']}"
        + (f", noise {settings['noise']}" if settings["noise"] is not None else ""),
        f"- schemes: {', '.join(methods)}; {bbb['epochs']} epochs (steps), lr {bbb['lr']}, "
        f"{bbb['particles']} particles" + (f", KL {bbb['kl']}, weighting {bbb['kl_weighting']}"
                                          if any(m.startswith("bbb") for m in methods) else "")
        + (f"; {bbb['seconds']} s" if bbb.get("seconds") is not None else ""),
        f"- reference: {ref['sampler']}, {ref.get('num_chains')} chains x ({ref.get('warmup_steps')} warmup + "
        f"{ref.get('num_samples')} draws), target acceptance {ref.get('target_accept_prob')}"
        + (f", max tree depth {ref['max_tree_depth']}" if "max_tree_depth" in ref else "")
        + (f", at most {ref['max_leapfrog_steps']} leapfrog steps" if "max_leapfrog_steps" in ref else "")
        + f"; {ref['seconds']} s",
        f"- seed {settings['seed']}; " + ", ".join(f"{k} {v}" for k, v in settings["versions"].items()),
    ]
    return lines


def _title(report) -> str:
    return "Inference schemes vs HMC: fidelity report" if hasattr(report, "summary") else \
        "BBB vs HMC: comparison report"


def to_markdown(report, settings: dict, pictures: list[str]) -> str:
    """The report folder's ``report.md``: settings, the comparison's tables, the pictures."""
    lines = [f"# {_title(report)}", ""]
    if settings.get("command"):
        lines += [f"Command: `{settings['command']}`", ""]
    lines += settings_lines(settings) + [""]
    body = report.to_markdown().splitlines()
    if body and body[0].startswith("# "):  # the report's own title: ours stands above
        body = body[1:]
    lines += body + [""]
    others, chains, note = _split_pictures(pictures)
    lines += [f"![{p}]({p})" for p in others]
    if chains:
        lines += ["", "## Reference chains", "", note, ""] + [f"![{p}]({p})" for p in chains]
    return "\n".join(lines) + "\n"


def _split_pictures(pictures: list[str]) -> tuple[list[str], list[str], str]:
    """The comparison's pictures, the reference's chain pictures (shown apart), and the
    sentence that says what to look for in those."""
    # Not at the top: check_out runs before any work and must stay cheap to import.
    from .compare import REFERENCE_PICTURES, REFERENCE_PICTURES_NOTE

    chains = [p for p in pictures if p in REFERENCE_PICTURES]
    return [p for p in pictures if p not in chains], chains, REFERENCE_PICTURES_NOTE


def _figures(pictures: list[str]) -> str:
    return "".join(f"<figure><img src='{p}' alt='{p}'><figcaption>{p}</figcaption></figure>" for p in pictures)


def to_html(report, settings: dict, pictures: list[str]) -> str:
    """The report folder's ``report.html``, self-contained but for the pictures beside it."""
    warnings = getattr(report, "warnings", None) or getattr(report, "reference_warnings", [])
    warn = "".join(f"<p class='warn'>{html.escape(str(w))}</p>" for w in warnings)
    summary = f"<p>{html.escape(report.summary())}</p>" if hasattr(report, "summary") else ""
    items = "".join(f"<li>{html.escape(s[2:])}</li>" for s in settings_lines(settings))
    others, chains, note = _split_pictures(pictures)
    imgs = _figures(others)
    if chains:
        imgs += f"<h2>Reference chains</h2><p>{html.escape(note)}</p>{_figures(chains)}"
    cmd = f"<p>Command: <code>{html.escape(settings['command'])}</code></p>" if settings.get("command") else ""
    space = getattr(report, "weight_space", None)
    weights = "" if space is None else "<h2>Weight space</h2>" + space.to_html(
        index=False, float_format=lambda v: f"{v:.4g}", border=0)
    table = report.table.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0, na_rep="")
    definitions = "".join(f"<li><code>{html.escape(k)}</code>: {html.escape(v)}</li>"
                          for k, v in getattr(report, "definitions", {}).items() if k in report.table.columns)
    definitions = f"<h2>Definitions</h2><ul>{definitions}</ul>" if definitions else ""
    title = _title(report)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right}}
th{{background:#f3f3f3}}.warn{{background:#fff3cd;border:1px solid #e0c060;padding:.6em}}
img{{max-width:100%}}figure{{display:inline-block;margin:.5em;max-width:48%}}</style></head>
<body><h1>{title}</h1>{summary}{cmd}<ul>{items}</ul>{warn}
<h2>Metrics</h2>{table}{definitions}
{weights}
<h2>Pictures</h2>{imgs}</body></html>
"""
