"""Evaluate a pack on held-out prepared samples: PSNR / SSIM (/ LPIPS) against the ground-truth renders of the views
not given to the model (all but view 0), and motion errors against the oracle motion, for the frames after the first.

    python scripts/evaluate.py --pack assets/pack --data-root data/pack --list data/pack/test.txt --out outputs/eval

It needs the pack and the held-out samples only (prepared samples: renders, cameras, voxel features, mesh points).

Rows, all on the same canonical Gaussians (the static VAE's reconstruction of frame 0):
- generated: the DiT sampled from view 0's image tokens, decoded by the motion VAE (what inference does);
- VAE reconstruction: the motion VAE's posterior mean of the true mesh motion, decoded (an upper bound for generation);
- oracle: the canonical moved by the oracle Δxyz (below), other Δ channels zero (what the xyz target alone gives);
- still: the canonical left unmoved;
- mean motion: the training set's mean latent of each frame (over objects and tokens), decoded on this canonical:
  the pack's mean_latent.pt (scripts/make_pack.py), or computed from <data-root>/latents of --train-list when given
  (the same numbers from the same latents). A pack without it and no --train-list: the row is left out, with a note.
Also frame 0 alone, i.e. the static VAE's reconstruction quality.

The oracle Δxyz of a Gaussian is the true mesh displacement interpolated at its centre by the mesh-guided KNN, the
motion VAE's xyz training target (pipeline/ground_truth.oracle_delta_xyz). Per row: EPE, the mean end-point error
against it; displacement, the mean |Δxyz|; ratio, the row's mean displacement over the true one (means over objects);
cosine, the |oracle|-weighted direction agreement (utils.metrics.motion_statistics). A still canonical can score a
PSNR close to the generated one; its EPE is the true displacement by construction, so EPE shows what PSNR hides.
Means ± population standard deviations over objects; win counts per object; the acceptance checks (checks()) pass/fail.

Written in --out: metrics.json (all of it, with the per-object values and seconds per object), metrics.md (the table),
per_object.csv (one line per object: each row's PSNR and EPE, and frame 0's PSNR; the values of metrics.json), and
renders/<name>.png for the first --renders objects (default 3): a strip of the first held-out view at a few frames after
the first, rows ground truth | generated | still | oracle, each cell upscaled to at least 128 px (nearest).

Speed: each row is rendered and scored in batches (pipeline/ground_truth.py, score_rows), frame 0 only where it is
reported (still = the static VAE's reconstruction). Tiny pack, data/pack test objects, one CPU thread: about 8 s per
object (12.6k Gaussians: 14 s), from about 24 s. Rendering is most of the time.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datasets import layout
from models.motion_vae import pad_gaussians
from pipeline.ground_truth import frames_covered, held_out_views, mesh_motion, oracle_delta_xyz, score_rows
from pipeline.outputs import label_patch
from pipeline.pack import PACK_FILES
from pipeline.video_to_4d import VideoTo4D
from scripts.make_pack import mean_latent
from utils import cli
from utils.checkpoint import safe_load
from utils.fileio import atomic_write
from utils.losses import load_lpips
from utils.metrics import ImageMetrics, motion_statistics
from utils.video import to_uint8

METHODS = ("generated", "VAE reconstruction", "oracle", "still", "mean motion")
MOTION_KEYS = ("epe", "displacement", "true_displacement", "ratio", "cosine")
STRIP_ROWS = ("ground truth", "generated", "still", "oracle")
STRIP_FRAMES = 4      # frames per strip, spread over those after the first
STRIP_MIN_CELL = 128  # strip cells are upscaled (nearest, by an integer factor) to at least this many pixels


def mean_motion_latents(data_root: Path, names: list[str], frames: int) -> torch.Tensor:
    """(T, C): the mean latent of each frame over the training objects and their tokens (scripts/make_pack.py
    mean_latent, the pack's mean_latent.pt, cut to `frames`)."""
    return mean_latent(data_root, names)[:frames]


def load_mean_latent(args, frames: int) -> tuple[torch.Tensor | None, str]:
    """The mean-motion row's latent (frames, C) and where it came from, or (None, why the row is left out)."""
    if args.train_list is not None:
        names = layout.read_list_file(args.train_list, args.data_root)
        return mean_motion_latents(args.data_root, names, frames), f"mean latent of {len(names)} objects of " \
                                                                   f"{args.train_list}"
    path = layout.mean_latent_path(args.pack)
    if not path.is_file():
        return None, f"mean motion left out: the pack has no {path.name} (scripts/make_pack.py writes it) and no " \
                     f"--train-list was given"
    mean = safe_load(path).float()
    if mean.dim() != 2 or len(mean) < frames:
        return None, f"mean motion left out: {path} holds {tuple(mean.shape)}, not ({frames}+, C) per-frame latents"
    return mean[:frames], f"the pack's {path.name}"


def strip_frames(num_frames: int) -> list[int]:
    """Up to STRIP_FRAMES frames spread evenly over those after the first (frame 0 alone when there is one)."""
    if num_frames == 1:
        return [0]
    return sorted({int(round(x)) for x in np.linspace(1, num_frames - 1, min(STRIP_FRAMES, num_frames - 1))})


def strip_image(cells: dict[str, list[torch.Tensor]], frames: list[int]) -> np.ndarray:
    """(rows·c, frames·c, 3) uint8: the rows STRIP_ROWS of `cells` ((3, H, W) in [0, 1] per frame), each image
    upscaled by an integer factor to c >= STRIP_MIN_CELL pixels (nearest); the row name at the top left of its first
    cell, t=<frame> at the top right of the first row's cells."""
    h, w = cells[STRIP_ROWS[0]][0].shape[-2:]
    f = max(1, math.ceil(STRIP_MIN_CELL / min(h, w)))
    body = np.stack([np.stack([to_uint8(img.movedim(0, -1).float().cpu()) for img in cells[r]]) for r in STRIP_ROWS])
    body = body.repeat(f, axis=2).repeat(f, axis=3)                                  # (R, F, h·f, w·f, 3)
    canvas = np.ascontiguousarray(body.transpose(0, 2, 1, 3, 4).reshape(len(STRIP_ROWS) * h * f, -1, 3))
    for r, name in enumerate(STRIP_ROWS):
        patch = label_patch(name, w * f)
        canvas[r * h * f: r * h * f + patch.shape[0], : patch.shape[1]] = patch
    for i, t in enumerate(frames):
        patch = label_patch(f"t={t}", w * f // 2)
        x1 = (i + 1) * w * f
        canvas[: patch.shape[0], x1 - patch.shape[1]: x1] = patch
    return canvas


def per_object_csv(result: dict) -> str:
    """per_object.csv: name, then each row's PSNR and EPE, then frame 0's PSNR, as metrics.json holds them (repr
    floats, so the text parses back to the same numbers; an empty cell where a value is None)."""
    slug = lambda m: m.lower().replace(" ", "_").replace("-", "_")
    per = result["per_object"]
    methods = list(result["methods"])
    header = ["name"] + [f"{slug(m)}_{k}" for m in methods for k in ("psnr", "epe")] + ["frame0_static_vae_psnr"]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    cell = lambda v: "" if v is None else repr(float(v))
    for i, name in enumerate(result["names"]):
        w.writerow([name] + [cell(per[m][i][k]) for m in methods for k in ("psnr", "epe")]
                   + [cell(per["frame0_static_vae"][i]["psnr"])])
    return buf.getvalue()


def summarize(entries: list[dict]) -> dict:
    """Mean and population std over objects of every key (k, k_std); None values (no oracle motion) left out."""
    out = {}
    for k in entries[0]:
        v = [e[k] for e in entries if e[k] is not None]
        out[k], out[f"{k}_std"] = (float(np.mean(v)), float(np.std(v))) if v else (None, None)
    return out


def read_names(args) -> list[str]:
    """The held-out names (after --limit), each a prepared sample under --data-root, or one-line refusals (a pack
    without its three weights files too: the canonical Gaussians come from its static VAE)."""
    for what, path in (("pack folder", args.pack), ("data root", args.data_root)):
        if not path.is_dir():
            raise cli.InputError(f"{path}: no such {what}")
    for file in PACK_FILES.values():
        if not (args.pack / file).is_file():
            raise cli.InputError(f"{args.pack / file}: missing from the pack")
    names = layout.read_list_file(args.list, args.data_root)[: args.limit]  # a bad entry: InputError naming the line
    if not names:
        raise cli.InputError(f"{args.list}: no sample names")
    for n in names:
        if not layout.has_renders(layout.resolve_sample(args.data_root, n)):
            raise cli.InputError(f"{args.list}: {n}: no prepared sample {args.data_root / n} (no imgs/ folder)")
    return names


@torch.no_grad()
def evaluate(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = read_names(args)
    pipe = VideoTo4D.load(args.pack, config=args.config, vae_config=args.vae_config, device=device)
    models = pipe.models
    motion = models.motion.motion_vae
    metrics = ImageMetrics(load_lpips(device=device))
    frames = args.num_frames or models.cfg.data.num_timesteps
    mean, mean_source = load_mean_latent(args, frames)
    methods = METHODS if mean is not None else tuple(m for m in METHODS if m != "mean motion")
    notes = [] if mean is not None else [mean_source]
    if notes:
        print(f"note: {notes[0]}")
    rows: dict[str, list] = {m: [] for m in methods}
    first: list[dict] = []
    seconds: list[float] = []
    keep = strip_frames(frames)
    for i, name in enumerate(names):
        start = time.perf_counter()
        sample = layout.resolve_sample(args.data_root, name)
        prepared = pipe.prepare(sample, num_frames=frames)
        tokens, canonical = prepared.tokens, prepared.canonical
        queries, _ = pad_gaussians([canonical.to_condition().float()])
        # The mesh points and the oracle once per object: the VAE encodes the same points the oracle interpolates.
        mesh = mesh_motion(sample, frames, motion.num_inputs, models.voxel_extractor)
        static_pc, mesh_deltas = mesh["static_pc"].to(device), mesh["deltas"].to(device)
        oracle = oracle_delta_xyz(canonical.xyz.float(), static_pc, mesh_deltas, motion)   # (T, N, 3)
        enc = motion.encode(static_pc[None], mesh_deltas[None], queries)
        still = torch.zeros(frames, len(canonical), 14, device=device)
        deltas = {
            "generated": models.motion(canonical, tokens, seed=args.seed).delta,
            "VAE reconstruction": motion.decode(enc.posterior.mean, queries)[0],
            "oracle": torch.cat([oracle, still[..., 3:]], -1),
            "still": still,
        }
        if mean is not None:
            deltas["mean motion"] = motion.decode(
                mean.to(device)[None, :, None].expand(1, frames, motion.num_latents, -1), queries)[0]
        views = held_out_views(sample, frames, device)  # read once for every row
        strip = i < args.renders
        scores, kept = score_rows(views, canonical, deltas, metrics, keep if strip else [])
        for method, delta in deltas.items():
            stats = motion_statistics(delta[..., :3], oracle)
            rows[method].append({**scores[method]["mean_after_first"], **{k: stats[k] for k in MOTION_KEYS}})
        first.append(scores["still"]["per_frame"][0])
        if strip:
            cells = {"ground truth": [views[t][0][0] for t in keep], **{r: kept[r] for r in STRIP_ROWS[1:]}}
            image = strip_image(cells, keep)
            path = args.out / "renders" / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"), overwrite=True)
        seconds.append(time.perf_counter() - start)
        print(f"[{i + 1}/{len(names)}] {name} ({seconds[-1]:.1f} s): " + ", ".join(
            f"{k} {rows[k][-1]['psnr']:.2f} dB EPE {rows[k][-1]['epe']:.4f}" for k in methods))
    summary = {m: summarize(v) for m, v in rows.items()}
    for v in summary.values():  # a ratio of means over objects: objects that barely move cannot blow it up
        true = v["true_displacement"]
        v["ratio"], v["ratio_std"] = (v["displacement"] / true if true else None), None
    psnr = lambda m: np.array([e["psnr"] for e in rows[m]])
    epe = lambda m: np.array([e["epe"] for e in rows[m]])
    wins = {"generated_beats_still_psnr": int((psnr("generated") > psnr("still")).sum()),
            **({"generated_beats_mean_motion_psnr": int((psnr("generated") > psnr("mean motion")).sum())}
               if "mean motion" in rows else {}),
            "generated_lower_epe_than_still": int((epe("generated") < epe("still")).sum())}
    result = {"objects": len(names), "frames": frames,
              "frames_covered": frames_covered(frames, after_first=True), "names": names,
              "methods": summary, "frame0_static_vae": summarize(first), "wins": wins,
              "mean_motion_source": mean_source if mean is not None else None, "notes": notes,
              "seconds_per_object": float(np.mean(seconds)), "per_object": {**rows, "frame0_static_vae": first},
              "per_object_seconds": seconds, "renders": min(args.renders, len(names))}
    result["checks"] = checks(result)
    return result


def checks(result: dict) -> list[dict]:
    """The project's acceptance thresholds, relative to S = still PSNR and F = frame-0 PSNR (means over objects):
    each {"check", "value", "threshold", "pass"}; an interval threshold is [low, high]. Without the mean-motion row
    its check is left out."""
    m, n = result["methods"], result["objects"]
    S, F = m["still"]["psnr"], result["frame0_static_vae"]["psnr"]
    gen, vae, still = m["generated"], m["VAE reconstruction"], m["still"]
    ratio = gen["ratio"] if gen["ratio"] is not None else float("nan")  # nan fails every comparison below
    ge = lambda check, value, threshold: (check, value, threshold, value >= threshold)
    le = lambda check, value, threshold: (check, value, threshold, value <= threshold)
    items = [ge("frame-0 PSNR F >= 26", F, 26.0),
             ge("VAE reconstruction PSNR >= S + 0.7 (F - S)", vae["psnr"], S + 0.7 * (F - S)),
             le("VAE reconstruction EPE <= 0.3 x still EPE", vae["epe"], 0.3 * still["epe"]),
             ge("generated PSNR >= S + 0.4 (F - S)", gen["psnr"], S + 0.4 * (F - S)),
             *([ge("generated PSNR >= mean-motion PSNR + 1", gen["psnr"], m["mean motion"]["psnr"] + 1.0)]
               if "mean motion" in m else []),
             le("generated EPE <= 0.6 x still EPE", gen["epe"], 0.6 * still["epe"]),
             ("generated / true displacement in [0.5, 1.5]", ratio, [0.5, 1.5], 0.5 <= ratio <= 1.5),
             ge("generated beats still in PSNR on >= 90% of objects",
                result["wins"]["generated_beats_still_psnr"] / n, 0.9)]
    return [{"check": c, "value": float(v), "threshold": t, "pass": bool(p)} for c, v, t, p in items]


def markdown(result: dict, command: str) -> str:
    image_keys = [k for k in ("psnr", "ssim", "lpips") if k in result["frame0_static_vae"]]
    f = lambda v, digits: "–" if v is None else f"{v:.{digits}f}"
    pm = lambda v, k, digits: f"{f(v[k], digits)} ± {f(v[k + '_std'], digits)}"
    image = lambda v: [pm(v, "psnr", 2)] + [f(v[k], 3) for k in image_keys[1:]]
    true = result["methods"]["still"]["true_displacement"]
    lines = [f"Held-out objects: {result['objects']}, {result['frames_covered']}, all views "
             f"but the conditioning one; EPE and displacement in world units against the oracle motion (true mean "
             f"displacement {f(true, 4)}); ratio = displacement / true; means ± std over objects. `{command}`", "",
             "| method | PSNR | " + " | ".join(k.upper() for k in image_keys[1:]) + " | EPE | displacement | ratio | "
             "cosine |", "|---|" + "---|" * (len(image_keys) + 4)]
    for m, v in result["methods"].items():
        lines.append(f"| {m} | " + " | ".join(image(v) + [pm(v, "epe", 4), f(v["displacement"], 4), f(v["ratio"], 2),
                                                          f(v["cosine"], 2)]) + " |")
    lines.append("| frame 0: static-VAE reconstruction | " + " | ".join(
        image(result["frame0_static_vae"]) + ["–"] * 4) + " |")
    w, n = result["wins"], result["objects"]
    beats_mean = f" beats mean motion in PSNR on {w['generated_beats_mean_motion_psnr']}/{n}," \
        if "generated_beats_mean_motion_psnr" in w else ""
    lines += ["", f"Generated beats still in PSNR on {w['generated_beats_still_psnr']}/{n} objects,{beats_mean} has a "
              f"lower EPE than still on {w['generated_lower_epe_than_still']}/{n}."]
    lines += [f"\nNote: {note}." for note in result["notes"]]
    lines += ["", f"Seconds per object: {result['seconds_per_object']:.1f}. Per object: per_object.csv; renders: "
              f"renders/<name>.png for the first {result['renders']}.", "",
              "Checks (S = still PSNR, F = frame-0 PSNR, means over objects):", ""]
    for c in result["checks"]:
        t = c["threshold"]
        bound = f"[{t[0]}, {t[1]}]" if isinstance(t, list) else f"{t:.4g}"
        lines.append(f"- {'PASS' if c['pass'] else 'FAIL'}: {c['check']}: {c['value']:.4g} (threshold {bound})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pack", type=Path, required=True)
    ap.add_argument("--data-root", type=Path, required=True)
    layout.add_symlink_option(ap)  # --allow-symlinks: follow symlinks out of the data root (set when parsed)
    ap.add_argument("--list", type=Path, required=True, help="held-out sample names")
    ap.add_argument("--train-list", type=Path, help="training names: the mean motion from their latents under "
                                                    "<data-root>/latents (default: the pack's mean_latent.pt)")
    ap.add_argument("--config", type=Path)
    ap.add_argument("--vae-config", type=Path)
    ap.add_argument("--num-frames", type=int)
    ap.add_argument("--limit", type=int, help="evaluate only the first N held-out objects")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--renders", type=int, default=3, metavar="K", help="PNG strips of the first K objects (default 3)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    result = evaluate(args)
    command = "python scripts/evaluate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(result, command)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "metrics.md", lambda tmp: tmp.write_text(table), overwrite=True)
    atomic_write(args.out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1)), overwrite=True)
    rows = per_object_csv(result)
    atomic_write(args.out / "per_object.csv", lambda tmp: tmp.write_text(rows), overwrite=True)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
