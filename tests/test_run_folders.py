"""Folders as a whole: utils/fileio.atomic_folder (outputs replaced in one swap) and lock_folder (one writer per
folder, a lock that dies with its process), and the trainers' run folders: an earlier run's checkpoints need
--resume latest or --restart (which moves the run aside, never deletes it), and a second trainer on a folder in use
refuses naming the holder's process id."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import main_latent
from test_main_latent import _latent_dataset
from utils import cli
from utils.fileio import LOCK_NAME, atomic_folder, lock_folder
from utils.training import check_run_folder

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/tiny/diffusion.yml"


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hold_lock(folder: Path) -> subprocess.Popen:
    """Another process holding lock_folder(folder) until killed."""
    code = ("import sys, time\nfrom utils.fileio import lock_folder\nheld = lock_folder(sys.argv[1])\n"
            "print('locked', flush=True)\ntime.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)  # as a crash: the process cannot clean anything up
    proc.wait(timeout=30)
    proc.stdout.close()


# ---------------------------------------------------------------------------------------------- atomic_folder

def test_atomic_folder_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "out" / "obj"
    with atomic_folder(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".") and not out.exists()
        for i in range(4):
            (tmp / f"frame_{i}.txt").write_text(f"old {i}")
    assert sorted(_tree(out)) == [f"frame_{i}.txt" for i in range(4)]
    with pytest.raises(FileExistsError):
        with atomic_folder(out):
            pass
    with atomic_folder(out, overwrite=True) as tmp:
        (tmp / "frame_0.txt").write_text("new 0")
        assert (out / "frame_3.txt").read_text() == "old 3"  # readers see the old folder until the swap
    assert _tree(out) == {"frame_0.txt": b"new 0"}              # no stale frame survives
    assert [p.name for p in out.parent.iterdir()] == ["obj"]   # no temporary or old folder left


def test_atomic_folder_failure_keeps_the_old_folder(tmp_path):
    out = tmp_path / "obj"
    with atomic_folder(out) as tmp:
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"\x00\x01")
    before = _tree(out)
    with pytest.raises(RuntimeError, match="midway"):
        with atomic_folder(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("half of a new run")
            raise RuntimeError("midway")
    assert _tree(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["obj"]


# ---------------------------------------------------------------------------------------------- lock_folder

def test_a_folder_lock_names_its_holder_and_dies_with_it(tmp_path):
    folder = tmp_path / "run"
    proc = hold_lock(folder)
    try:
        with pytest.raises(cli.InputError, match=rf"run is in use by process {proc.pid} \(started .+\); wait for it"):
            lock_folder(folder)
    finally:
        _stop(proc)
    with lock_folder(folder) as lock:  # killed, not cleaned up: the lock went with the process
        assert (folder / LOCK_NAME).read_text().startswith(f'{{"pid": {os.getpid()}')
        again = lock_folder(folder)    # the same process may take it again (several loops in turn)
        again.release()
    assert lock._key is None


# ---------------------------------------------------------------------------------------------- trainers

def _train(root, out, *extra, steps=2):
    return cli.run(main_latent.main, ["--config", CONFIG, "--data-root", str(root), "--out", str(out),
                                      f"train.max_steps={steps}", "train.batch_size=1", "train.sample_timesteps=2",
                                      "train.log_interval=100", "train.save_interval=100", "data.end_idx=null",
                                      "+train.tensorboard=false", "+train.progress=false", *extra])


def _latest(run: Path) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


@pytest.fixture
def latents(tmp_path):
    root = tmp_path / "data"
    _latent_dataset(root)
    return root


def test_a_run_folder_with_checkpoints_needs_resume_or_restart(latents, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(latents, run, steps=3) == 0
    assert _latest(run) == "step_0000003"
    capsys.readouterr()
    # Without --resume or --restart: refused at the start, one line, nothing touched.
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert _train(latents, run) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resume latest" in err and "--restart" in err and str(run) in err, err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before and _latest(run) == "step_0000003"
    # Both together contradict each other.
    assert _train(latents, run, "--restart", "--resume", "latest") == 2
    assert "--restart" in capsys.readouterr().err
    # --resume latest continues at step 3.
    assert _train(latents, run, "--resume", "latest", steps=4) == 0
    assert _latest(run) == "step_0000004"

    # --restart: the earlier run is moved aside whole (its checkpoints kept), the new one starts at step 0.
    assert _train(latents, run, "--restart", steps=2) == 0
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1, list(tmp_path.iterdir())
    assert _latest(aside[0]) == "step_0000004" and (aside[0] / "checkpoints" / "step_0000004").is_dir()
    assert not (aside[0] / LOCK_NAME).exists()
    assert _latest(run) == "step_0000002"  # from step 0: a resumed run would have had nothing to do
    assert [p.name for p in (run / "checkpoints").iterdir() if p.is_dir()] == ["step_0000002"]
    # A folder without checkpoints (nothing saved yet) is no earlier run.
    check_run_folder(tmp_path / "fresh", None)


def test_a_second_trainer_on_a_folder_in_use_refuses(latents, tmp_path, capsys):
    run = tmp_path / "run"
    proc = hold_lock(run)
    try:
        assert _train(latents, run) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"is in use by process {proc.pid} (started " in err, err
        assert not (run / "checkpoints").exists()
    finally:
        _stop(proc)
    assert _train(latents, run) == 0  # the holder died (killed): no stale lock
    assert _latest(run) == "step_0000002"
