"""The benchmark report: analysis tables -> one self-contained HTML page (`build_report`) and CSV tables."""

from carebench.report.html import build_report, read_planted

__all__ = ["build_report", "read_planted"]
