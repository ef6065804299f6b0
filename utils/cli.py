"""How every command-line tool ends: the one owner of refusals and exit statuses (no torch import).

    if __name__ == "__main__":
        sys.exit(cli.run(main))

- Bad input (InputError and the project's refusal types below, a missing or unreadable file, a `SystemExit("text")`)
  prints one line on stderr, `<tool>: error: <what and where>`, and exits 2. `--debug` anywhere on the command line
  shows the traceback instead.
- Ctrl-C exits 130 with one line; a clean return passes its status through (0, or 1 when a batch had failures).
- Anything else is a bug: the traceback is shown and the status is 1.
- Warnings print as one line, `warning: <text>`, through tqdm so that a progress bar is redrawn below them.
"""
from __future__ import annotations

import os
import sys
import traceback
import warnings
from typing import Callable, Sequence

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class InputError(ValueError):
    """Input the user can fix (a file, a folder, an option): the message names the file and what was wrong."""


def refusal_types() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input, not a bug. Imported lazily: a tool that never touches torch stays light."""
    types: list[type[BaseException]] = [InputError, FileNotFoundError, FileExistsError, IsADirectoryError,
                                        NotADirectoryError, PermissionError]
    for module, name in (("utils.config", "ConfigError"), ("utils.checkpoint", "CheckpointError"),
                         ("utils.video", "VideoReadError")):
        mod = sys.modules.get(module)  # only types whose module the tool loaded can have been raised
        if mod is not None and hasattr(mod, name):
            types.append(getattr(mod, name))
    return tuple(types)


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (torch's unpickling advice and multi-line details folded away)."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    first, *rest = text.splitlines()
    return first if not rest else first + " (" + "; ".join(r.strip() for r in rest if r.strip())[:300] + ")"


def tool_name(argv0: str | None = None) -> str:
    path = argv0 or sys.argv[0] or "gvf"
    name = os.path.basename(path)
    if name == "__main__.py":  # `python -m package`: the package is the tool
        return os.path.basename(os.path.dirname(os.path.abspath(path)))
    return name[:-3] if name.endswith(".py") else name


def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for the command-line tools: no source file and line, no bar broken in two."""
    text = f"warning: {one_line(message if isinstance(message, BaseException) else Warning(str(message)))}"
    try:
        from tqdm import tqdm
        tqdm.write(text, file=file or sys.stderr)
    except ImportError:
        print(text, file=file or sys.stderr)


def _close_bars() -> None:
    """End live progress bars first, so that the refusal starts on a line of its own (a bar leaves its line open)."""
    tqdm_module = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm_module, "tqdm", None), "_instances", ()) or ()):
        try:
            bar.close()
        except Exception:  # a bar half torn down by the exception itself: nothing to restore
            pass


def _refuse(prog: str, exc: BaseException, debug: bool) -> int:
    _close_bars()
    if debug:
        traceback.print_exc()
    print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
    return EXIT_BAD_INPUT


def run(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Call main(argv) (argv without `--debug`) and turn its ending into an exit status and at most one line."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("GVF_DEBUG") == "1"
    args = [a for a in args if a != "--debug"]
    prog = tool_name()
    if not debug:
        warnings.showwarning = one_line_warning
    try:
        status = main(args)
    except SystemExit as e:  # argparse's own exits (code 2 / 0) and `raise SystemExit("message")` refusals
        if isinstance(e.code, str):
            return _refuse(prog, e, debug)
        return 0 if e.code is None else int(e.code)
    except KeyboardInterrupt:
        _close_bars()
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except refusal_types() as e:
        return _refuse(prog, e, debug)
    return 0 if status is None else int(status)
