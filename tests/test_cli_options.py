"""Bad options and names end in one line and exit status 2 (never a traceback or silence); warnings are one
line; importing the command line is cheap (no torch); every --help works."""

from __future__ import annotations

import json
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


# ---------------------------------------------------------------------------------------------------------
# Importing the command line is cheap, and every --help works
# ---------------------------------------------------------------------------------------------------------
HELP_ALL = """
import sys
import typer.main
from typer.testing import CliRunner
import avlens.cli

assert "torch" not in sys.modules and "transformers" not in sys.modules, "import avlens.cli imported torch"
root = typer.main.get_command(avlens.cli.app)

def paths(command, prefix):
    yield prefix
    for name, sub in getattr(command, "commands", {}).items():
        yield from paths(sub, [*prefix, name])

failed = []
for path in paths(root, []):
    result = CliRunner().invoke(avlens.cli.app, [*path, "--help"], terminal_width=120)
    if result.exit_code != 0 or "Usage:" not in result.output:
        failed.append((path, result.exit_code, result.output[-300:]))
    if path and "Example:" not in result.output:
        failed.append((path, "no example"))
    if "{" + (path[-1] if path else "") + "}" in result.output:
        failed.append((path, "metavar in braces"))
print(len(list(paths(root, []))), failed, "torch" in sys.modules)
"""


def test_importing_the_cli_does_not_import_torch_and_every_help_works():
    out = subprocess.run([sys.executable, "-c", HELP_ALL], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split(" ", 1)[0]) >= 12, out.stdout
    assert out.stdout.strip().endswith("[] False"), out.stdout


def test_help_text_keeps_brackets_and_names_metavars():
    out = avlens("data", "counterfactual", "--help")
    assert out.returncode == 0
    text = " ".join(out.stdout.split())
    assert "video, [audio], audio_label" in text and '{"group": [labels]}' in text and "[[label, label], ...]" in text
    assert "MANIFEST OUT" in text and "{manifest}" not in text
    run = " ".join(avlens("run", "--help").stdout.split())
    assert "ANALYSIS" in run and "Kinds: hear and see" in run and "organism:vl-base" in run


# ---------------------------------------------------------------------------------------------------------
# Bad options: one line, exit 2, saying what is allowed
# ---------------------------------------------------------------------------------------------------------
RUN = ("run", "counterfactual", "--model", "organism", "--data", "missing.jsonl", "--out", "out")
INSPECT = ("inspect", "organism", "--audio", "a.wav")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((*RUN, "--question", "What sound?"), "--question takes KIND=PROMPT (kinds for counterfactual: hear, see)"),
        (
            (*RUN, "--question", "listen=What do you hear?"),
            "unknown kind 'listen' for counterfactual (kinds: hear, see)",
        ),
        ((*RUN, "--question", "hear=  "), "--question hear=: the prompt is empty"),
        ((*INSPECT, "--prompt", "hi", "--fps", "0"), "--fps must be a number of frames per second above 0, got 0"),
        ((*INSPECT, "--prompt", ""), "--prompt: the prompt is empty"),
        (("inspect", "organism", "--prompt", "hi"), "give at least one of --video, --audio, --image"),
        (("inspect", "organism", "--audio", "a.wav", "--bogus"), "avlens inspect: No such option: --bogus"),
        (("reproduce", "--model", "organism"), "--model takes LABEL=MODEL"),
        (("data", "counterfactual", "m.jsonl", "out"), "give --groups, --pairs or --organism-groups"),
    ],
)
def test_bad_options_are_one_line_and_status_2(args, message, tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "avlens", *args], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert out.returncode == 2, out.stderr
    assert lines(out.stderr) == [lines(out.stderr)[0]] and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_question_kinds_come_from_the_config_and_the_manifest(tmp_path):
    from avlens.analyses import get
    from avlens.cli import _question_kinds, _questions
    from avlens.errors import InputError

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "video": "a.mp4", "expect_listen": "bell"}\n')
    config = get("counterfactual").config()
    assert _question_kinds(config, manifest) == ["hear", "see", "listen"]
    assert _questions(["listen=What do you listen to?"], config, manifest, "counterfactual") == {
        "listen": "What do you listen to?"
    }
    with pytest.raises(InputError, match="kinds: hear, see, listen"):
        _questions(["smell=What?"], config, manifest, "counterfactual")


# ---------------------------------------------------------------------------------------------------------
# An unknown model fails at once, offline, in one line
# ---------------------------------------------------------------------------------------------------------
def test_unknown_model_fails_at_once_in_one_line():
    out = avlens(
        "inspect", "no-such-org/no-such-model", "--audio", "a.wav", "--prompt", "hi", env={"HF_HUB_OFFLINE": "1"}
    )
    assert out.returncode == 2, out.stderr
    assert len(lines(out.stderr)) == 1, out.stderr
    assert "no-such-org/no-such-model" in out.stderr and "avlens models" in out.stderr and "organism" in out.stderr
    bad = avlens("inspect", "./no/such/dir", "--audio", "a.wav", "--prompt", "hi", env={"HF_HUB_OFFLINE": "0"})
    assert bad.returncode == 2 and len(lines(bad.stderr)) == 1 and "not a hub id" in bad.stderr, bad.stderr


def test_the_organism_loads_offline_through_the_command_line(tmp_path):
    """The early refusal of unknown names knows the organism's: `avlens inspect organism` works offline."""
    import numpy as np
    import soundfile as sf

    wav = tmp_path / "tone.wav"
    sf.write(wav, (0.1 * np.sin(np.arange(16000) / 8)).astype(np.float32), 16000)
    for name in ("organism", "organism:av-balanced"):
        out = avlens("inspect", name, "--audio", str(wav), "--prompt", "What do you hear?", env={"HF_HUB_OFFLINE": "1"})
        assert out.returncode == 0, out.stderr
        assert "answer:" in out.stdout, out.stdout


def test_unknown_model_offline_makes_no_network_call(monkeypatch):
    from avlens.errors import ModelNotFoundError
    from avlens.models import load

    def no_network(*args, **kwargs):
        raise AssertionError("a network connection was attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match=r"not in the local hub cache .*avlens models.*organism"):
        load("no-such-org/no-such-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a name that cannot be a hub id is refused before the hub too
    with pytest.raises(ModelNotFoundError, match="not a hub id"):
        load("no/such/local/dir")


# ---------------------------------------------------------------------------------------------------------
# Output: strict JSON, failed rows listed, warnings on one line, token_shift's --base
# ---------------------------------------------------------------------------------------------------------
def test_printed_json_is_strict(capsys):
    from avlens.cli import print_json

    print_json({"a": float("nan"), "b": [1.0, float("inf")]})

    def refuse(constant):
        raise ValueError(constant)

    assert json.loads(capsys.readouterr().out, parse_constant=refuse) == {"a": None, "b": [1.0, None]}


def test_failed_rows_are_listed_on_stderr_capped(tmp_path, capsys):
    from avlens.cli import _failed_rows
    from avlens.runs import RunDir

    errors = [
        {"id": f"r{i}/{k}", "condition": "factual", "reason": f"/m/c{i}.mp4: no audio track"}
        for i in range(14)
        for k in ("hear", "see")
    ]
    with RunDir.open(tmp_path / "run", {"x": 1}) as run:
        run.write_many("u", {"toy.errors": errors, "toy.rows": [{"x": 1}]})
    _failed_rows(tmp_path / "run")
    err = capsys.readouterr().err
    assert lines(err)[0].startswith("14 row(s) failed and were left out") and "toy.errors.parquet" in lines(err)[0]
    assert lines(err)[1] == "  sample r0: /m/c0.mp4: no audio track" and lines(err)[-1] == "  ... 4 more"
    assert len(lines(err)) == 12


def test_warnings_print_as_one_line(capsys):
    from avlens.cli import _one_line_warning

    _one_line_warning(UserWarning("sample a: 2 word(s)\noutside x"), UserWarning, "/src/avlens/models/qwen.py", 400)
    assert capsys.readouterr().err == "avlens: warning: sample a: 2 word(s) outside x\n"
    _one_line_warning(UserWarning("sample b: 2 word(s) outside x"), UserWarning, "qwen.py", 400)  # the same again
    assert capsys.readouterr().err == ""


def test_token_shift_without_base_suggests_the_organism_base():
    from avlens.analyses import get
    from avlens.errors import InputError
    from avlens.reproduce import check_needs

    with pytest.raises(InputError, match=r"token_shift needs a base model: give --base.*--base organism:vl-base"):
        check_needs(get("token_shift"), base=None)


def test_ctrl_c_in_a_command_is_one_line_with_what_was_saved_and_status_130(capsys):
    import typer

    from avlens.cli import fails_cleanly

    @fails_cleanly
    def command():
        raise KeyboardInterrupt("saved 2 of 5 units in out; re-run the same command to resume")

    with pytest.raises(typer.Exit) as stopped:
        command()
    assert stopped.value.exit_code == 130
    assert (
        capsys.readouterr().err == "avlens: interrupted; saved 2 of 5 units in out; re-run the same command to resume\n"
    )


def test_an_unknown_model_is_refused_before_torch_is_imported():
    code = (
        "import sys, avlens\n"
        "try:\n    avlens.load('no-such-org/no-such-model')\n"
        "except avlens.ModelNotFoundError as e:\n    print(e)\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert "not in the local hub cache" in out.stdout and out.stdout.strip().endswith("False"), out.stdout


def test_builders_problems_are_capped(capsys):
    from types import SimpleNamespace

    from avlens.cli import _problems

    problems = [{"id": f"r{i}", "file": f"/m/{i}.mp4", "reason": "no audio track"} for i in range(15)]
    _problems(SimpleNamespace(problems=problems, written=3, manifest="out/manifest.jsonl"))
    err = lines(capsys.readouterr().err)
    assert err[0] == "skipped r0: /m/0.mp4: no audio track" and err[-1] == "... 5 more" and len(err) == 11
