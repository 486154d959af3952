"""The guide's "Moving from Orbax" section runs as written, on its own.

Every code block of that section of docs/checkpointing_guide.md is taken from the file
and run in order in an empty directory, with the runner the whole-guide test uses
(``tests.scenarios.guide``: ``python`` blocks with ``exec``, ``bash`` blocks a
``shardckpt`` command a line through ``tools.cli.main``). The section alone is enough (a
reader who jumps to it creates the Orbax checkpoints it converts), each command is silent
on stderr (Orbax's logging is silenced, captured at the file descriptor), and what the
blocks make is what the text says they make.
"""

from __future__ import annotations

import numpy as np
import pytest

from shardckpt import CheckpointManager
from shardckpt.loading.open import open_checkpoint
from tests.scenarios.guide import GUIDE, RUNNABLE, blocks, run_block

ocp = pytest.importorskip("orbax.checkpoint")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

SECTION = "## Moving from Orbax"


def test_the_section_has_its_blocks():
    langs = [lang for lang, _ in blocks(GUIDE.read_text(), SECTION)]
    assert langs.count("bash") >= 1 and langs.count("python") >= 2, langs
    assert set(langs) <= set(RUNNABLE), f"tag every block of {SECTION!r} bash or python: {langs}"


def test_every_block_runs_as_written_from_an_empty_directory(tmp_path, monkeypatch, capfd):
    work = tmp_path / "empty"
    work.mkdir()
    monkeypatch.chdir(work)
    commands = 0
    for n, (lang, code) in enumerate(blocks(GUIDE.read_text(), SECTION)):
        try:
            ran = run_block(lang, code, {"__name__": f"guide_block_{n}"}, f"{GUIDE.name} {SECTION!r} block {n}")
        finally:
            err = capfd.readouterr().err
        if ran:
            assert err == "", f"block {n} wrote to stderr: {err[:2000]}"   # Orbax's logging is silenced
        commands += ran
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
