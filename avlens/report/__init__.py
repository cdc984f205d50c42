"""Reports: a self-contained HTML file of figures, tables and the comparison with the paper.

:class:`Finding` lives with the analyses (:mod:`avlens.analyses.base`), which make them; it is re-exported here
for report authors. The report reads analyses; analyses never import the report.
"""

from ..analyses.base import VERDICTS, Finding
from .html import Report

__all__ = ["VERDICTS", "Finding", "Report"]
