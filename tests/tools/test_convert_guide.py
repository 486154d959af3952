"""The guide's "Moving from Orbax" section runs as written.

Every code block of that section of docs/checkpointing_guide.md is taken from the file
and run in order in an empty directory: ``bash`` blocks line by line through the
``shardckpt`` command (``tools.cli.main``, with the arguments as the shell splits them),
``python`` blocks with ``exec``, each in a namespace of its own (a block imports what it
uses). A block without a language, or a command that is not ``shardckpt``, fails the test:
the section cannot drift from what runs.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest

from shardckpt import CheckpointManager
from shardckpt.loading.open import open_checkpoint
from shardckpt.tools.cli import main

ocp = pytest.importorskip("orbax.checkpoint")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "checkpointing_guide.md"
SECTION = "## Moving from Orbax"
FENCE = re.compile(r"^```([A-Za-z]*)\n(.*?)^```$", re.S | re.M)


def guide_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the section, in order."""
    text = GUIDE.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    section = text[start:end if end >= 0 else len(text)]
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(section)]


def test_the_section_has_its_blocks():
    langs = [lang for lang, _ in guide_blocks()]
    assert langs.count("bash") >= 1 and langs.count("python") >= 2, langs
    assert set(langs) <= {"bash", "python"}, f"tag every block of {SECTION!r} bash or python: {langs}"


def test_every_block_runs_as_written_from_an_empty_directory(tmp_path, monkeypatch, capsys):
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    commands = 0
    for n, (lang, code) in enumerate(guide_blocks()):
        if lang == "python":
            exec(compile(code, f"{GUIDE.name} block {n}", "exec"), {"__name__": f"guide_block_{n}"})
            continue
        assert lang == "bash", f"block {n}: untagged or unknown language {lang!r}"
        for line in code.splitlines():
            argv = shlex.split(line, comments=True)
            if not argv:
                continue
            assert argv[0] == "shardckpt", f"block {n}: {line!r} is not a shardckpt command"
            rc = main(argv[1:])
            err = capsys.readouterr().err
            assert rc == 0, f"{line!r} exited {rc}: {err}"
            assert err == "", f"{line!r} wrote to stderr: {err[:2000]}"   # Orbax's logging is silenced
            commands += 1
    assert commands >= 6

    # what the blocks made is what the guide says they make
    assert open_checkpoint(work / "ckpt").items == ["model", "optimizer"]
    assert open_checkpoint(work / "ckpt").read_config()["model_config"]["hidden_size"] > 0
    assert open_checkpoint(work / "ckpt_1000").step == 1000
    assert CheckpointManager(work / "ckpts").all_steps() == [500, 1000]
    assert open_checkpoint(work / "ckpts" / "step_1000").metrics == {"loss": 2.0}
    with ocp.CheckpointManager((work / "orbax_run2").absolute()) as mngr:
        assert mngr.all_steps() == [500, 1000]
    tensors = safetensors_numpy.load_file(str(work / "model.safetensors"))
    weights = open_checkpoint(work / "ckpt").read_arrays("model")
    assert set(tensors) == set(weights)   # this model has no RNG state
    assert all(np.array_equal(tensors[k], np.asarray(weights[k])) for k in tensors)
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == []   # nothing left beside
