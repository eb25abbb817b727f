"""The tables of a report page, by id: rows of (text, attributes) cells (for tests that read the HTML)."""

from __future__ import annotations

from html.parser import HTMLParser


class Tables(HTMLParser):
    """Tables by id: rows of (text, attributes) cells."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: dict[str, list[list[tuple[str, dict]]]] = {}
        self.current: str | None = None
        self.cell: list[str] | None = None
        self.attrs: dict = {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.current = a.get("id", f"anon{len(self.tables)}")
            self.tables[self.current] = []
        elif tag == "tr" and self.current:
            self.tables[self.current].append([])
        elif tag in ("td", "th") and self.current:
            self.cell, self.attrs = [], a

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self.cell is not None:
            self.tables[self.current][-1].append(("".join(self.cell).strip(), self.attrs))
            self.cell = None
        elif tag == "table":
            self.current = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)
