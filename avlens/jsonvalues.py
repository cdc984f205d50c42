"""Values as strict JSON: what summary.json, run.json and every ``--json`` print go through.

JSON has no NaN or infinity; Python's json module writes them anyway (as bare ``NaN``, which strict parsers
refuse). Missing figures are therefore ``null`` everywhere avlens writes JSON. Light on purpose (standard library
only): the command line and the analyses' registry import it without loading numpy, pandas or torch.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from typing import Any


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: dataclasses as dicts, numpy scalars and arrays as Python values, tuples as
    lists, NaN and infinities as None. Anything else JSON cannot hold becomes its ``str``."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and callable(obj.tolist):  # numpy scalars and arrays
        return jsonable(obj.tolist())
    if isinstance(obj, bool) or obj is None or isinstance(obj, int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return str(obj)


def strict_json(obj: Any) -> Any:
    """:func:`jsonable` checked to be strict JSON (``json.dumps(..., allow_nan=False)`` succeeds): what every
    summary.json and printed result goes through."""
    out = jsonable(obj)
    json.dumps(out, allow_nan=False)
    return out
