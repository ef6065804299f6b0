#!/usr/bin/env python
"""Open a result's 4D viewer (viewer.html: one self-contained file, works offline) in the default browser.

    python scripts/view.py outputs/demo/obj_00023                 # writes viewer.html if missing, then opens it
    python scripts/view.py outputs/demo/obj_00023 --serve         # serves the folder: http://127.0.0.1:8000/viewer.html
    python scripts/view.py outputs/demo/obj_00023 --rewrite --no-open   # rebuild viewer.html from animation.npz only
    python scripts/view.py outputs/demo/obj_00023 --query "frame=3&az=30&el=20&bg=white&play=0"
    python scripts/view.py outputs/demo/obj_00023 --query "frame=3&az=30&bg=white&play=0" --screenshot viewer.png

viewer.html is built from the folder's animation.npz (and compare.mp4's input column, summary.json's fps); see
pipeline/viewer.py for its URL parameters (frame, az, el, radius, fov, tx ty tz, w h, bg, play, speed, ui, bench).
--serve is for browsers that refuse file:// pages or for viewing from another machine; the file itself needs no server.
--screenshot saves a PNG of the page (panel included; `ui=0` in --query leaves it out) from headless Chromium with
software WebGL, once the requested frame and view are drawn; it needs Chromium (Debian: apt-get install chromium).
"""
from __future__ import annotations

import argparse
import functools
import http.server
import sys
import webbrowser
from pathlib import Path

from utils import cli


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", type=Path, help="an inference result folder (holds animation.npz), or its viewer.html")
    ap.add_argument("--rewrite", action="store_true", help="rebuild viewer.html even if it exists")
    ap.add_argument("--serve", action="store_true", help="serve the folder over http instead of opening the file")
    ap.add_argument("--port", type=int, default=8000, help="with --serve (0: any free port)")
    ap.add_argument("--host", default="127.0.0.1", help="with --serve; 0.0.0.0 to allow other machines")
    ap.add_argument("--query", default="", help="URL parameters for the opened page, e.g. 'frame=3&az=30&bg=white'")
    ap.add_argument("--no-open", action="store_true", help="do not start a browser")
    ap.add_argument("--screenshot", type=Path, help="save a PNG of the page from headless Chromium instead of opening it")
    ap.add_argument("--size", default="900x560", help="with --screenshot: window size WxH in pixels")
    args = ap.parse_args(argv)

    folder = args.folder
    if folder.is_file() and folder.name in ("viewer.html", "animation.npz"):  # the folder meant, named by a file in it
        folder = folder.parent
    if not folder.is_dir():
        raise cli.InputError(f"{folder}: no such folder (give an inference result folder)")
    page = folder / "viewer.html"
    if args.rewrite or not page.exists():
        from pipeline.viewer import viewer_from_result  # torch only when there is something to write
        viewer_from_result(folder, overwrite=True)
        print(f"wrote {page} ({page.stat().st_size / 2**20:.1f} MiB)")
    query = f"?{args.query.lstrip('?')}" if args.query else ""

    if args.screenshot:
        screenshot(page.resolve().as_uri() + query, args.screenshot, args.size)
        print(f"wrote {args.screenshot}")
        return 0
    if not args.serve:
        url = page.resolve().as_uri() + query
        if args.no_open or not webbrowser.open(url):
            print(f"open {url} in a browser")
        return 0

    handler = functools.partial(QuietHandler, directory=str(folder))
    try:
        server = http.server.ThreadingHTTPServer((args.host, args.port), handler)
    except OSError as e:
        raise cli.InputError(f"cannot serve on {args.host}:{args.port} ({e.strerror or e})") from None
    with server:
        host, port = server.server_address[:2]
        url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/viewer.html{query}"
        print(f"serving {folder} at {url} (Ctrl-C to stop)", flush=True)
        if not args.no_open:
            webbrowser.open(url)
        try:
            server.serve_forever()
        except KeyboardInterrupt:  # the normal way to stop serving
            pass
    return 0


def screenshot(url: str, out: Path, size: str) -> None:
    from pipeline.viewer import READY_JS
    from utils.headless_chromium import DevToolsError, HeadlessChromium, find_chromium

    try:
        width, height = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise cli.InputError(f"--size {size!r}: expected WxH, e.g. 900x560") from None
    binary = find_chromium()
    if binary is None:
        raise cli.InputError("--screenshot needs Chromium (Debian: apt-get install chromium; or set CHROMIUM=/path)")
    with HeadlessChromium(binary, timeout=600) as browser:
        page = browser.open(url, width, height)
        try:
            page.wait_for(READY_JS, timeout=600)
        except DevToolsError as e:
            raise cli.InputError(f"{url}: {e}") from None
        png = page.screenshot()
    from utils.fileio import atomic_write
    atomic_write(out, lambda tmp: tmp.write_bytes(png), overwrite=True)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # one line per request would bury the URL
        pass


if __name__ == "__main__":
    sys.exit(cli.run(main))
