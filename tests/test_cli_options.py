"""Bad options and names end in one line and exit status 2 (never a traceback or silence); warnings are one
line; importing the command line is cheap (no torch); every --help works."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import warnings

import pytest

from avlens.models.qwen import oov_message


def avlens(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "avlens", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.strip()]


# ---------------------------------------------------------------------------------------------------------
# Out-of-vocabulary words: one line, distinct words, capped
# ---------------------------------------------------------------------------------------------------------
def test_oov_message_is_one_line_of_distinct_capped_words():
    words = [f"w{i}" for i in range(25)]
    text = oov_message("s0", "organism", words)
    assert "\n" not in text and "w0, w1" in text and "w9 and 15 more" in text and "w10" not in text
    assert text.startswith("sample s0: 25 word(s) outside organism's vocabulary")


def test_a_long_prompt_warns_once_with_each_word_once(omni):
    from avlens.models import Sample

    prompt = " ".join(["zebras", "giraffes"] * 2000 + ["what", "do", "you", "hear"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        omni.prepare([Sample(prompt, id="long")])
    oov = [str(w.message) for w in caught if "vocabulary" in str(w.message)]
    assert len(oov) == 1 and len(oov[0]) < 200, oov
    assert oov[0].count("zebras") == 1 and oov[0].count("giraffes") == 1
