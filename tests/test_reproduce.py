"""llmqueue.paper.reproduce: each target writes its figures and report; the paper's claims hold (quick)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmqueue.errors import ConfigError
from llmqueue.paper.reproduce import TARGETS, Report, reproduce

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TABLE_HEADER = "| claim | paper | llmqueue measured | holds? |"

# Each target's figures, and the claims the paper makes that hold in this model, in report order.
EXPECTED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fig1": (
        ("fig1_backlog.png",),
        (
            "FasterTransformer's queue grows without bound below capacity",
            "vanilla vLLM's queue grows without bound below capacity",
            "Orca keeps up",
            "Sarathi-Serve keeps up",
            "FasterTransformer and vLLM latency grows without bound; Orca and Sarathi's does not",
            "Orca and Sarathi are work-conserving, FasterTransformer and vLLM are not",
        ),
    ),
    "example": (
        ("example_batches.png",),
        (
            "vanilla vLLM's batches (b = 4)",
            "Orca's batches (b = 5)",
            "FasterTransformer's batches (b = 4)",
            "Sarathi-Serve's batches (b = 4)",
            "vanilla vLLM's batch 2 is not work-conserving",
            "FasterTransformer's batches 2-4 are not work-conserving (prefills blocked behind decodes)",
            "Orca and Sarathi-Serve are work-conserving",
        ),
    ),
    "theorem": (
        ("theorem_throughput.png", "theorem_latency.png"),
        (
            "Throughput optimality: work-conserving Orca and Sarathi-Serve are stable below lambda*",
            "Capacity: above lambda* no system keeps up",
            "Fluid limit: above lambda* a work-conserving backlog grows at lambda (m_p + m_d) - b/t(b)",
            "Orca and Sarathi-Serve reach the maximal token throughput b/t(b)",
            "FasterTransformer and vanilla vLLM saturate below lambda* (can be unstable below it)",
            "A bigger budget buys throughput: lambda* rises with b",
            "... at the price of longer iterations: time per output token rises with b",
        ),
    ),
    "vertex-c": (
        ("vertex-c_region.png", "vertex-c_backlog.png"),
        (
            "Vertex C for b0 = 128, k_max = 100 is (29/46.75, 99/46.75) tokens/ms",
            "One 290 + 990-token request every 467.5 ms sits at vertex C",
            "Only Sarathi-Serve with b = 128 is stable",
            "Sarathi-128 locks into 29 + 99-token batches",
            "FasterTransformer-128 and vLLM-128 never admit a 290-token prompt whole into a 128 budget",
            "With a batch-size limit, work-conserving alone does not guarantee stability",
        ),
    ),
    "rs": (
        ("rs_backlog.png",),
        (
            "the exit-first priorities form a virtual station with load > 1 although each engine's "
            "load is 0.9",
            "under the exit-first priorities the backlog oscillates with growing peaks and diverges",
            "reversing the priorities is stable",
            "(beyond the paper) max-pressure stays stable where the bad priority diverges, up to "
            "0.95 per engine",
        ),
    ),
}


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Report]:
    """All targets once, in quick mode, into one folder."""
    out = tmp_path_factory.mktemp("reproduce") / "new" / "folder"  # created on demand
    return out, reproduce("all", out, quick=True)


def test_targets_are_the_five() -> None:
    assert set(TARGETS) == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_target_writes_its_figures_and_report(reports: tuple[Path, Report], name: str) -> None:
    out, report = reports
    figures, claims = EXPECTED[name]
    for fig in figures:
        path = out / fig
        assert path in report.files
        assert path.read_bytes()[:8] == PNG_SIGNATURE
    md = (out / f"{name}.md").read_text(encoding="utf-8")
    assert md in report.markdown
    assert TABLE_HEADER in md
    for claim in claims:
        assert f"| {claim} |" in md
    assert "Caveats:" in md
    for fig in figures:
        assert f"]({fig})" in md


@pytest.mark.parametrize("name", list(EXPECTED))
def test_the_papers_claims_hold(reports: tuple[Path, Report], name: str) -> None:
    """Every claim is reported as holding, in order, for every target."""
    _, report = reports
    got = [(c, h) for c, h in report.claims if c in EXPECTED[name][1]]
    assert got == [(c, True) for c in EXPECTED[name][1]]


def test_all_report_collects_the_targets(reports: tuple[Path, Report]) -> None:
    out, report = reports
    assert report.name == "all"
    assert report.all_hold
    assert [c for c, _ in report.claims] == [c for _, claims in EXPECTED.values() for c in claims]
    assert out / "all.md" in report.files
    assert (out / "all.md").read_text(encoding="utf-8") == report.markdown
    assert all(path.exists() for path in report.files)


def test_a_single_target_returns_its_own_report(tmp_path: Path) -> None:
    report = reproduce("example", tmp_path, quick=True)
    assert report.name == "example"
    assert report.files == (tmp_path / "example_batches.png", tmp_path / "example.md")
    assert [c for c, _ in report.claims] == list(EXPECTED["example"][1])
    assert "[Ad Bd Cd] [Ad Bd Cd Dp] [Bd Cd Dd Ep] [Bd Ed]" in report.markdown


@pytest.mark.parametrize("name", ["fig2", "", "ALL", None])
def test_unknown_name_raises(tmp_path: Path, name: object) -> None:
    with pytest.raises(ConfigError) as err:
        reproduce(name, tmp_path)  # type: ignore[arg-type]
    assert err.value.field == "name"
    assert list(tmp_path.iterdir()) == []


def test_out_dir_that_is_a_file_raises(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("x", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        reproduce("example", target)
    assert err.value.field == "out_dir"
