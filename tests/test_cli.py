"""utils/cli.py, the one owner of refusals: bad input is one line on stderr and exit status 2, --debug shows the
traceback, bugs keep theirs, warnings are one line; and the real commands behave so."""
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from utils import cli
from utils.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]


def _raiser(exc):
    def main(argv):
        raise exc
    return main


@pytest.mark.parametrize("exc", [cli.InputError("a.png: broken\nmore detail"), FileNotFoundError(2, "No such file", "x.pt"),
                                 CheckpointError("w.pt: refused"), SystemExit("list.txt: line 3: bad name")])
def test_refusals_are_one_line_and_status_2(exc, capsys):
    assert cli.run(_raiser(exc), []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and ": error: " in err
    assert {"InputError": "a.png: broken", "FileNotFoundError": "x.pt: No such file", "CheckpointError": "w.pt: refused",
            "SystemExit": "list.txt: line 3"}[type(exc).__name__] in err


def test_debug_shows_the_traceback_and_is_not_passed_on(capsys):
    seen = []

    def main(argv):
        seen.append(list(argv))
        raise cli.InputError("x: bad")
    assert cli.run(main, ["--a", "--debug"]) == 2
    assert seen == [["--a"]] and "Traceback" in capsys.readouterr().err


def test_statuses_pass_through_and_bugs_keep_their_traceback():
    assert cli.run(lambda a: 1, []) == 1 and cli.run(lambda a: None, []) == 0
    assert cli.run(_raiser(SystemExit(0)), []) == 0 and cli.run(_raiser(SystemExit(2)), []) == 2
    assert cli.run(_raiser(KeyboardInterrupt()), []) == 130
    with pytest.raises(ZeroDivisionError):  # not bad input: a bug must not be dressed up as a refusal
        cli.run(_raiser(ZeroDivisionError("x")), [])


def test_warnings_print_as_one_line(capsys, monkeypatch):
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test

    def main(argv):
        warnings.warn("matting: no transparency\nusing the threshold", stacklevel=1)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert cli.run(main, []) == 0
    err = capsys.readouterr().err
    assert err == "warning: matting: no transparency (using the threshold)\n"


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize("tool", ["latent_stats", "converter"])
def test_refused_pickles_say_one_line_without_torchs_advice(tmp_path, tool):
    """A pickle that would run code, read by two real commands as a user runs them (a subprocess)."""
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"w": torch.ones(2), "x": _Payload()}, f)  # a foreign pickle, not even torch.save
    if tool == "converter":
        cmd = [sys.executable, "scripts/convert_checkpoint.py", str(evil), str(tmp_path / "o.safetensors"), "--kind", "dit"]
    else:  # the statistics of a pack: inference reads them before anything else
        pack = tmp_path / "pack"
        pack.mkdir()
        for name in ("static_mean", "static_std", "deformation_mean", "deformation_std"):
            (pack / f"{name}.pt").write_bytes(evil.read_bytes())
        cmd = [sys.executable, "-c", "import sys; from utils import cli; from datasets.latent_dataset import "
               "load_latent_stats as f; sys.exit(cli.run(lambda a: f(a[0]) and 0))", str(pack)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and ("evil.pt" in lines[0] or "_mean.pt" in lines[0]), p.stderr
    assert "refused" in lines[0] and "weights_only" not in p.stderr and "Traceback" not in p.stderr


def test_a_refusal_under_a_live_progress_bar_starts_its_own_line(capsys):
    from tqdm import tqdm

    def main(argv):
        bar = tqdm(total=3, desc="train")
        bar.update(1)  # left open, as an exception inside a loop leaves it
        raise cli.InputError("dl/imgs/x.png: outside the data root")
    assert cli.run(main, []) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    prog, message = last.split(": error: ")
    assert message == "dl/imgs/x.png: outside the data root" and "train" not in prog, last


def test_tool_name_of_a_script_and_of_a_package_run_with_dash_m():
    assert cli.tool_name("/r/data_rendering/import_animation.py") == "import_animation"
    assert cli.tool_name("/r/data_rendering/game_assets/__main__.py") == "game_assets"
