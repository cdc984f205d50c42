"""Samples and manifests: reading and writing clip tables, and building datasets from them.

* :mod:`avlens.data.manifest`: CSV / JSONL / Parquet manifests (``read_manifest``, ``write_manifest``).
* :mod:`avlens.data.builders`: counterfactual variants, multi-clip prompts.

Nothing here runs a model: unimodal-dominance splits, which ask the model, are
:func:`avlens.analyses.dominance.dominance`.
"""

from .builders import (
    CONDITIONS,
    NOTHING,
    BuildReport,
    article,
    counterfactual,
    first_label,
    multiclip,
    samples_from_multiclip,
)
from .manifest import read_manifest, relative_path, write_manifest

__all__ = [
    "CONDITIONS",
    "NOTHING",
    "BuildReport",
    "article",
    "counterfactual",
    "first_label",
    "multiclip",
    "read_manifest",
    "relative_path",
    "samples_from_multiclip",
    "write_manifest",
]
