"""``shardckpt demo``: train, save sharded checkpoints, get killed, resume, compare bits.

The parent process starts a local Ray cluster (or uses threads with ``--backend
threads``) and computes a reference run that never stops. A child process trains the same
run, saving every few steps through the CheckpointManager; the parent SIGKILLs it mid-run.
A second child resumes from the latest committed checkpoint and finishes. The demo prints
who wrote each shard and whether the resumed run matches the reference bit for bit.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path


def child_main(argv: list[str]) -> int:
    """Training process: ``python -m shardckpt.tools.demo child DIR STEPS EVERY BACKEND ADDRESS``."""
    directory, steps, every, backend, address = argv[0], int(argv[1]), int(argv[2]), argv[3], argv[4]
    if backend == "ray":
        import ray
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    from shardckpt.api.manager import CheckpointManager
    from shardckpt.lm.training import batch_for_step, make_tx, new_run, state_digest, train_step

    manager = CheckpointManager(directory, max_to_keep=3, backend=backend, num_shards=4, num_writers=2)
    state = manager.load_latest(tx=make_tx())
    if state is None:
        model, optimizer = new_run()
        start = 0
    else:
        model, optimizer, start = state.model, state.optimizer, state.step + 1
        print(json.dumps({"event": "resumed", "step": state.step}), flush=True)
    for step in range(start, steps):
        loss = float(train_step(model, optimizer, batch_for_step(step)))
        if (step + 1) % every == 0 or step == steps - 1:
            manager.save(step, model, optimizer, metrics={"loss": loss})
            print(json.dumps({"event": "saved", "step": step, "loss": loss}), flush=True)
        else:
            print(json.dumps({"event": "step", "step": step, "loss": loss}), flush=True)
    print(json.dumps({"event": "done", "digest": state_digest(model, optimizer)}), flush=True)
    return 0


def _spawn(directory: Path, steps: int, every: int, backend: str, address: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "shardckpt.tools.demo", "child", str(directory), str(steps),
                             str(every), backend, address or "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _events(proc: subprocess.Popen):
    for line in proc.stdout:
        line = line.strip()
        if line.startswith("{"):
            try:
                yield json.loads(line)
            except ValueError:
                continue


def describe_event(ev: dict) -> str:
    """A child's progress event as a line of text."""
    kind, step, loss = ev.get("event"), ev.get("step"), ev.get("loss")
    loss_text = f"loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
    if kind == "step":
        return f"step {step}: {loss_text}"
    if kind == "saved":
        return f"step {step}: {loss_text}, checkpoint saved"
    if kind == "resumed":
        return f"resumed from the checkpoint of step {step}"
    if kind == "done":
        return f"finished; state digest {str(ev.get('digest', ''))[:16]}…"
    return " ".join(f"{k}={v}" for k, v in ev.items())


def _target_dir(directory: Path | None) -> Path:
    """Where the demo writes its checkpoints: ``directory`` itself (created; it must be new
    or empty, the demo never deletes what it did not write), else a new temp directory."""
    if directory is None:
        return Path(tempfile.mkdtemp(prefix="shardckpt-demo-"))
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise DemoDirError(f"{directory}: exists and is not an empty directory; choose a new or empty "
                           "one (the demo writes its checkpoints there)")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


class DemoDirError(Exception):
    pass


def run_demo(directory: Path | None, steps: int, every: int, kill_after: int, backend: str,
             *, cleanup: bool = False) -> int:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, emoji=False, soft_wrap=True)   # paths stay on one line
    try:
        directory = _target_dir(directory)
    except DemoDirError as e:
        print(f"shardckpt demo: error: {e}", file=sys.stderr)
        return 2
    address = "-"
    if backend == "ray":
        import ray
        console.print("[bold]Starting a local Ray cluster[/bold] ...")
        ctx = ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        address = ctx.address_info["gcs_address"]
    ok = False
    try:
        from shardckpt.lm.training import batch_for_step, new_run, state_digest, train_step

        console.print(f"Checkpoints go to {directory}")
        console.print(f"Reference run: {steps} steps of a tiny LMModel (dropout on), never interrupted")
        model, optimizer = new_run()
        for step in range(steps):
            train_step(model, optimizer, batch_for_step(step))
        reference = state_digest(model, optimizer)

        console.print(f"Training run in a child process, saving every {every} steps with backend={backend}; "
                      f"it will be killed (SIGKILL) after step {kill_after}")
        proc = _spawn(directory, steps, every, backend, address)
        killed_at = None
        for ev in _events(proc):
            console.print(f"  child: {describe_event(ev)}")
            if ev.get("step", -1) >= kill_after:
                proc.send_signal(signal.SIGKILL)
                killed_at = ev["step"]
                break
        proc.wait()
        if killed_at is None:
            console.print(f"[red]the child ended before step {kill_after}:[/red]\n{proc.stderr.read()}")
            return 1
        console.print(f"[bold red]Killed[/bold red] the training process after step {killed_at} "
                      f"(exit code {proc.returncode})")

        from shardckpt.api.manager import CheckpointManager
        from shardckpt.loading.checkpoint import Checkpoint
        manager = CheckpointManager(directory, max_to_keep=3, backend="threads")
        console.print(f"Committed checkpoints on disk: steps {manager.all_steps()}")
        latest = Checkpoint(manager.step_path(manager.latest_step))
        console.print(f"[bold]Shards of step {latest.step}[/bold]")
        table = Table()
        for col in ("file", "bytes", "writer", "node", "pid"):
            table.add_column(col, overflow="fold")
        for name, rec in latest.manifest.files.items():
            w = rec.writer
            table.add_row(name, str(rec.size), str(w.get("writer", "?")), str(w.get("node_id", w.get("host", "?")))[:12],
                          str(w.get("pid", "?")))
        console.print(table)

        console.print("Resuming in a new process from the latest committed checkpoint ...")
        proc = _spawn(directory, steps, every, backend, address)
        digest = None
        for ev in _events(proc):
            console.print(f"  child: {describe_event(ev)}")
            if ev.get("event") == "done":
                digest = ev["digest"]
        proc.wait()
        if digest is None:
            console.print(f"[red]resume failed:[/red]\n{proc.stderr.read()}")
            return 1
        ok = digest == reference
        console.print(f"reference digest {reference[:16]}…  resumed digest {digest[:16]}…")
        if ok:
            console.print("[bold green]Resumed run matches the uninterrupted run bit for bit "
                          "(parameters, optimizer state, dropout RNG).[/bold green]")
        else:
            console.print("[bold red]MISMATCH: the resumed run differs from the reference.[/bold red]")
        return 0 if ok else 1
    finally:
        if backend == "ray":
            import ray
            ray.shutdown()
        if cleanup:
            shutil.rmtree(directory, ignore_errors=True)
            console.print(f"Removed {directory} (--cleanup)")
        else:
            console.print(f"The checkpoints are kept in {directory}. Look at them with:\n"
                          f"  shardckpt ls {directory}\n"
                          f"  shardckpt inspect {directory}/step_{steps - 1}\n"
                          f"  shardckpt verify {directory}\n"
                          f"and remove them with `rm -r {directory}` (or run the demo with --cleanup).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dir", type=Path, default=None,
                   help="write the checkpoints into this new or empty directory (default: a new temp dir)")
    p.add_argument("--steps", type=int, default=12, help="training steps")
    p.add_argument("--save-every", type=int, default=3, help="save a checkpoint every N steps")
    p.add_argument("--kill-after", type=int, default=7, help="SIGKILL the trainer after this step")
    p.add_argument("--backend", choices=("ray", "threads"), default="ray", help="who writes the shards")
    p.add_argument("--cleanup", action="store_true", help="remove the checkpoints when the demo ends")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        sys.exit(child_main(sys.argv[2:]))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    a = parser.parse_args()
    sys.exit(run_demo(a.dir, a.steps, a.save_every, a.kill_after, a.backend, cleanup=a.cleanup))
