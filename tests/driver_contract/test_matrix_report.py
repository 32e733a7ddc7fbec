"""``iommufd-model matrix --json FILE --html FILE``: the three outputs tell the same story."""

from __future__ import annotations

import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from iommufd_model import cli
from iommufd_model.mock.driver import MockDriver
from iommufd_model.scenarios import SCENARIOS

from .test_cli import LyingMock, TypedMock, _reg, parse_table

VOID = {"meta", "link", "br", "hr", "img", "input", "col", "area", "base", "wbr", "source"}


class Page(HTMLParser):
    """Well-formedness (every element closed, in order) and what the report is made of."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.cells: dict[tuple[str, str], str] = {}
        self.tags: list[str] = []
        self.external: list[str] = []
        self._cell: tuple[str, str] | None = None
        self._in_text = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append(tag)
        if tag in ("script", "link", "img", "iframe") or any(k in ("src", "href") for k in a):
            self.external.append(tag)
        if tag == "td":
            key = (a.get("data-scenario") or "", a.get("data-driver") or "")
            if key in self.cells:
                self.errors.append(f"two cells for {key}")
            self.cells[key] = a.get("data-status") or ""
            self._cell = key
        if tag == "span" and a.get("class") in ("st", "costs") and self._cell:
            self._in_text = True
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)  # <rect .../> inside the SVG: opened and closed at once

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()
        self._in_text = False
        if tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._in_text and self._cell:  # the status text shown in the cell
            self.cells[self._cell] += f"|{data}"


def _page(html: str) -> Page:
    page = Page()
    page.feed(html)
    page.close()
    assert page.errors == [], page.errors
    assert page.stack == [], f"unclosed: {page.stack}"
    return page


def test_json_html_agree_with_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reg = _reg(mock=MockDriver(), liar=LyingMock(), typed=TypedMock())
    jpath, hpath = tmp_path / "m.json", tmp_path / "m.html"
    rc = cli.main(["matrix", "--json", str(jpath), "--html", str(hpath)], reg)
    assert rc == 1  # the liar fails paging_dma
    out = capsys.readouterr().out
    table, texts = parse_table(out), parse_table(out, full=True)
    drivers = ["liar", "mock", "typed"]
    assert set(table) == {(s, d) for s in SCENARIOS for d in drivers}

    data = json.loads(jpath.read_text())
    assert data["drivers"] == drivers
    assert [s["name"] for s in data["scenarios"]] == list(SCENARIOS)
    shown = {"pass": "pass", "fail": "FAIL", "unsupported": "unsupported"}
    from_json = {(c["scenario"], c["driver"]): shown[c["status"]] for c in data["cells"]}
    assert from_json == table
    assert table["paging_dma", "liar"] == "FAIL"
    for c in data["cells"]:  # the table's compact costs are the JSON's, rounded the same way
        key = (c["scenario"], c["driver"])
        if c["status"] != "unsupported":
            ms = f"{c['wall_s'] * 1000:.0f}ms"
            costs = [f"{cli.compact_number(c['costs'][k])}{u}" for k, u in cli.COMPACT]
            assert texts[key] == " ".join([shown[c["status"]], *costs, ms]), key
        if c["status"] != "pass":
            assert f"{c['scenario']} @ {c['driver']}: {shown[c['status']]}: {c['detail']}" in out

    page = _page(hpath.read_text())
    assert page.external == [], "the page must be self-contained"
    assert "svg" in page.tags and "rect" in page.tags and "style" in page.tags
    assert set(page.cells) == set(table), "one <td> per (scenario, driver)"
    for key, value in page.cells.items():
        status, text, cell_costs = value.split("|")
        assert shown[status] == table[key] == text, key
        if status != "unsupported":
            assert f"{text} {cell_costs}" == texts[key], key


def test_html_in_headless_chromium(tmp_path: Path) -> None:
    browser = next(
        (b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None
    )
    if browser is None:
        pytest.skip("chromium is not on PATH: the page was only validated with html.parser")
    hpath, shot = tmp_path / "m.html", tmp_path / "m.png"
    assert cli.main(["matrix", "--html", str(hpath)], _reg(mock=MockDriver())) == 0
    res = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1400,1200",
            hpath.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shot.exists() and shot.stat().st_size > 1000, res.stderr
    dom = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", hpath.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert dom.count('data-driver="mock"') == len(SCENARIOS) and "<svg" in dom


def test_html_shows_fail_reasons_log_bars_and_calm_colours(tmp_path: Path) -> None:
    hpath = tmp_path / "m.html"
    reg = _reg(mock=MockDriver(), liar=LyingMock())
    assert cli.main(["matrix", "--scenario", "paging_dma", "--html", str(hpath)], reg) == 1
    html = hpath.read_text()
    cell = html.split('data-scenario="paging_dma" data-driver="liar"', 1)[1].split("</td>", 1)[0]
    assert '<span class="why">' in cell and "read after unmap" in cell
    for colour in cli.PALETTE:  # no bar colour is a red like the FAIL cells'
        r, g, b = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
        assert not (r > 0xA0 and g < 0x80 and b < 0x80), colour
    # log scale: a cost 1/1000 of the peak still draws a third of the panel, zero draws nothing
    assert cli._bar_width(0, 1000, 100) == 0
    assert 30 < cli._bar_width(9, 999, 100) < 40
    assert cli._bar_width(999, 999, 100) == pytest.approx(100)


def test_scenario_descriptions_are_whole() -> None:
    for s in SCENARIOS.values():
        assert s.doc.endswith("."), (s.name, s.doc)
        first = (s.fn.__doc__ or "").strip().split("\n\n")[0]
        assert s.doc == " ".join(first.split()), s.name
