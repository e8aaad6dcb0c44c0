"""The docs pages generated from code match the code they come from."""

from pathlib import Path

from pyro_bbb.fidelity import DEFINITIONS, definitions_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_the_committed_metrics_page_is_what_definitions_markdown_writes():
    page = (DOCS / "metrics.md").read_text()
    assert page == definitions_markdown(), (
        "docs/metrics.md is stale: rewrite it with pyro_bbb.fidelity.definitions_markdown()")


def test_the_metrics_page_has_one_row_per_definition_with_its_text():
    rows = [line for line in (DOCS / "metrics.md").read_text().splitlines() if line.startswith("| `")]
    assert [r.split("`")[1] for r in rows] == list(DEFINITIONS)
    for row, text in zip(rows, DEFINITIONS.values()):
        cell = row.split(" | ", 1)[1].removesuffix(" |").replace("\\|", "|")
        assert cell == text
