"""The README's commands cannot drift from the command-line tools: every command of every ```bash block runs as written
on a fresh clone after the quick start (`.venv/bin/...`, `make`, `scripts/...`, never a bare `python` or `accelerate`
that only an activated venv would find), its program answers --help, and every --option it uses is one the program
offers."""
import re
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = (".venv/bin/python", ".venv/bin/accelerate", ".venv/bin/torchrun")


def readme_commands(text: str) -> list[str]:
    """Each command of the ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()  # a comment starts at a '#' after a space
            if line:
                commands.append(line)
    return commands


def program(command: str) -> tuple[list[str], list[str]]:
    """(the argv that prints the program's --help, the arguments the README passes it)."""
    words = shlex.split(command)
    head = words[0]
    if head == "make":
        return [], words[1:]
    if head.startswith("scripts/") and head.endswith(".sh"):
        return ["bash", head], words[1:]
    if head not in VENV:
        raise AssertionError(f"`{command}`: `{head}` is not found on a fresh clone (use .venv/bin/..., make or scripts/)")
    rest = words[1:]
    if head != ".venv/bin/python":  # a launcher: its own options up to the script
        if head.endswith("accelerate"):
            assert rest[0] == "launch", command
            rest = rest[1:]
        while rest and rest[0].startswith("-"):
            takes_value = "=" not in rest[0] and len(rest) > 1 and not rest[1].startswith("-") \
                and not rest[1].endswith(".py")
            rest = rest[2:] if takes_value else rest[1:]
    if rest[0] == "-m":
        return [sys.executable, "-m", rest[1]], rest[2:]
    assert rest[0].endswith(".py"), command
    return [sys.executable, rest[0]], rest[1:]


TEXT = (ROOT / "README.md").read_text()
COMMANDS = readme_commands(TEXT)


def test_the_readme_has_its_workflows():
    assert len(COMMANDS) >= 15 and "make demo" in COMMANDS and "make test" in COMMANDS
    for section in ("## Video to 4D", "## Training", "## Evaluation"):
        assert section in TEXT


def test_every_command_runs_as_written_and_uses_only_existing_options():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    helps: dict[tuple, list[str]] = {}
    uses = []
    for command in COMMANDS:
        argv, args = program(command)
        if not argv:
            assert args and all(a in targets for a in args), f"`{command}`: no such make target"
            continue
        helps.setdefault(tuple(argv), [])
        uses.append((command, tuple(argv), args))

    def help_text(argv):
        p = subprocess.run([*argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        return p.returncode, p.stdout + p.stderr

    with ThreadPoolExecutor(2) as pool:
        answers = dict(zip(helps, pool.map(help_text, helps)))
    for command, argv, args in uses:
        code, text = answers[argv]
        assert code == 0, f"`{' '.join(argv[1:])} --help` failed:\n{text[-2000:]}"
        for option in {a.split("=")[0] for a in args if a.startswith("--")}:
            assert re.search(rf"(^|[\s,\[]){re.escape(option)}\b", text), f"`{command}`: {option} is not in its --help"


@pytest.mark.parametrize("bad", ["accelerate launch main_vae.py --config x", "python scripts/evaluate.py --pack p",
                                 "torchrun --nproc_per_node 2 main_vae.py"])
def test_commands_only_an_activated_venv_would_find_are_refused(bad):
    with pytest.raises(AssertionError, match="not found on a fresh clone"):
        program(bad)


def test_the_python_example_runs_as_written_from_another_folder(tmp_path):
    """The README's ```python block of the pipeline API, run by the venv's interpreter in a folder outside the repository that only links
    assets/ (the editable install, not the working directory, makes the packages importable); what it prints agrees
    with the animation.npz it saved, read back here with numpy."""
    import numpy as np
    blocks = [b for b in re.findall(r"```python\n(.*?)```", TEXT, re.S) if "VideoTo4D" in b]
    assert len(blocks) == 1
    (tmp_path / "assets").symlink_to(ROOT / "assets")
    (tmp_path / "example.py").write_text(blocks[0])
    p = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": ""})
    assert p.returncode == 0, p.stderr
    frames, gaussians, shown = re.fullmatch(r"(\d+) frames of (\d+) Gaussians, mean displacement ([\d.]+)\n",
                                            p.stdout).groups()
    npz = np.load(tmp_path / "outputs/python/obj_00023/animation.npz")
    delta = npz["delta"].astype(np.float64)
    assert delta.shape[:2] == (int(frames), int(gaussians)) == (int(frames), len(npz["xyz"]))
    assert float(shown) == pytest.approx(np.linalg.norm(delta[1:, :, :3], axis=-1).mean(), abs=1e-4)
    assert float(shown) > 0
    assert len(list((tmp_path / "outputs/python/obj_00023/ply").glob("frame_*.ply"))) == int(frames)
