"""Reports: a self-contained HTML file of figures, tables and the comparison with the paper."""

from .html import VERDICTS, Finding, Report

__all__ = ["VERDICTS", "Finding", "Report"]
