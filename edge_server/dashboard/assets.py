"""The page's files (edge_server/dashboard/static), shared by the live server and the report."""

from __future__ import annotations

from importlib import resources

SOURCE_MAP = "//# sourceMappingURL=chart.umd.min.js.map"  # not shipped: the line would only make browsers ask


def static_text(name: str) -> str:
    text = resources.files("edge_server.dashboard").joinpath("static", name).read_text(encoding="utf-8")
    return text.replace(SOURCE_MAP, "")


def page(scripts: str, styles: str) -> str:
    """The page with ``scripts`` and ``styles`` in place of its markers (links when served, inline in the report)."""
    return static_text("index.html").replace("<!--STYLES-->", styles).replace("<!--SCRIPTS-->", scripts)
