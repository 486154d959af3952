"""Run a scenario script in a fresh interpreter (fake devices need a fresh jax) and parse
the JSON line it prints."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_scenario(name: str | Path, *args: str, timeout: float = 400, env: dict | None = None,
                 cwd: str | None = None) -> dict:
    """``name``: a script in this folder, or a path to one elsewhere."""
    script = Path(name) if os.sep in str(name) else Path(__file__).with_name(str(name))
    full_env = dict(os.environ, RAY_ADDRESS="",
                    PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    if not lines:
        raise AssertionError(f"{name} failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def run_python(code: str, args: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    """``python -c code args...`` in a fresh interpreter with this repo on the path."""
    env = dict(os.environ, RAY_ADDRESS="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)
