"""Evaluate a pack on held-out prepared samples: PSNR / SSIM (/ LPIPS) against the ground-truth renders of the views
not given to the model (all but view 0), and motion errors against the oracle motion, for the frames after the first.

    python scripts/evaluate.py --pack assets/pack --data-root data/pack --list data/pack/test.txt \\
        --train-list data/pack/train.txt --out outputs/eval

Rows, all on the same canonical Gaussians (the static VAE's reconstruction of frame 0):
- generated: the DiT sampled from view 0's image tokens, decoded by the motion VAE (what inference does);
- VAE reconstruction: the motion VAE's posterior mean of the true mesh motion, decoded (an upper bound for generation);
- oracle: the canonical moved by the oracle Δxyz (below), other Δ channels zero (what the xyz target alone gives);
- still: the canonical left unmoved;
- mean motion: the training set's mean latent of each frame (over objects and tokens), decoded on this canonical.
Also frame 0 alone, i.e. the static VAE's reconstruction quality.

The oracle Δxyz of a Gaussian is the true mesh displacement interpolated at its centre by the mesh-guided KNN, the
motion VAE's xyz training target (inference_dpm_latent.oracle_delta_xyz). Per row: EPE, the mean end-point error
against it; displacement, the mean |Δxyz|; ratio, the row's mean displacement over the true one (means over objects);
cosine, the |oracle|-weighted direction agreement (utils.metrics.motion_statistics). A still canonical can score a
PSNR close to the generated one; its EPE is the true displacement by construction, so EPE shows what PSNR hides.
Means ± population standard deviations over objects; win counts per object; the acceptance checks (CHECKS) pass/fail.
metrics.json holds all of it with the per-object values; metrics.md the table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import inference_dpm_latent as inference  # noqa: E402
from datasets import layout  # noqa: E402
from models.motion_vae import pad_gaussians  # noqa: E402
from utils.fileio import atomic_write  # noqa: E402
from utils.losses import load_lpips  # noqa: E402
from utils.metrics import ImageMetrics, motion_statistics  # noqa: E402

METHODS = ("generated", "VAE reconstruction", "oracle", "still", "mean motion")
MOTION_KEYS = ("epe", "displacement", "true_displacement", "ratio", "cosine")


def mean_motion_latents(data_root: Path, names: list[str], frames: int) -> torch.Tensor:
    """(T, C): the mean latent of each frame over the training objects and their tokens."""
    total, count = 0.0, 0
    for n in names:
        mu = torch.load(layout.latent_path(data_root, n), map_location="cpu", weights_only=True)["latent_mean"].double()
        total, count = total + mu[:frames].mean(1), count + 1
    if count == 0:
        raise SystemExit(f"no training latents under {data_root / 'latents'}: run encode_latent.py first")
    return (total / count).float()


def summarize(entries: list[dict]) -> dict:
    """Mean and population std over objects of every key (k, k_std); None values (no oracle motion) left out."""
    out = {}
    for k in entries[0]:
        v = [e[k] for e in entries if e[k] is not None]
        out[k], out[f"{k}_std"] = (float(np.mean(v)), float(np.std(v))) if v else (None, None)
    return out


@torch.no_grad()
def evaluate(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inf_args = inference.parse_args(["--input", str(args.data_root), "--out", str(args.out), "--pack", str(args.pack),
                                     *(["--config", str(args.config)] if args.config else []),
                                     *(["--vae-config", str(args.vae_config)] if args.vae_config else [])])
    models = inference.load_models(inf_args, device)
    motion = models.motion.motion_vae
    metrics = ImageMetrics(load_lpips(device=device))
    names = layout.read_list_file(args.list, args.data_root)[: args.limit]
    frames = args.num_frames or models.cfg.data.num_timesteps
    mean_latent = mean_motion_latents(args.data_root, layout.read_list_file(args.train_list, args.data_root), frames)
    rows: dict[str, list] = {m: [] for m in METHODS}
    first: list[dict] = []
    for i, name in enumerate(names):
        job = inference.Job(name, layout.resolve_sample(args.data_root, name), "sample")
        tokens, canonical, _, _ = inference.sample_inputs(models, job, inf_args, frames, device)
        queries, _ = pad_gaussians([canonical.to_condition().float()])
        # The mesh points and the oracle once per object: the VAE encodes the same points the oracle interpolates.
        mesh = inference.mesh_motion(job, frames, motion.num_inputs, models.voxel_extractor)
        static_pc, mesh_deltas = mesh["static_pc"].to(device), mesh["deltas"].to(device)
        oracle = inference.oracle_delta_xyz(canonical.xyz.float(), static_pc, mesh_deltas, motion)   # (T, N, 3)
        enc = motion.encode(static_pc[None], mesh_deltas[None], queries)
        still = torch.zeros(frames, len(canonical), 14, device=device)
        deltas = {
            "generated": models.motion(canonical, tokens, seed=args.seed).delta,
            "VAE reconstruction": motion.decode(enc.posterior.mean, queries)[0],
            "oracle": torch.cat([oracle, still[..., 3:]], -1),
            "still": still,
            "mean motion": motion.decode(
                mean_latent.to(device)[None, :, None].expand(1, frames, motion.num_latents, -1), queries)[0],
        }
        views = inference.held_out_views(job, frames, device)  # read once for every row
        for method, delta in deltas.items():
            m = inference.ground_truth_metrics(views, canonical, delta.float(), metrics)
            stats = motion_statistics(delta[..., :3], oracle)
            rows[method].append({**m["mean_after_first"], **{k: stats[k] for k in MOTION_KEYS}})
            if method == "still":
                first.append(m["per_frame"][0])
        print(f"[{i + 1}/{len(names)}] {name}: " + ", ".join(
            f"{k} {rows[k][-1]['psnr']:.2f} dB EPE {rows[k][-1]['epe']:.4f}" for k in METHODS))
    methods = {m: summarize(v) for m, v in rows.items()}
    for v in methods.values():  # a ratio of means over objects: objects that barely move cannot blow it up
        true = v["true_displacement"]
        v["ratio"], v["ratio_std"] = (v["displacement"] / true if true else None), None
    psnr = lambda m: np.array([e["psnr"] for e in rows[m]])
    epe = lambda m: np.array([e["epe"] for e in rows[m]])
    wins = {"generated_beats_still_psnr": int((psnr("generated") > psnr("still")).sum()),
            "generated_beats_mean_motion_psnr": int((psnr("generated") > psnr("mean motion")).sum()),
            "generated_lower_epe_than_still": int((epe("generated") < epe("still")).sum())}
    result = {"objects": len(names), "frames": frames, "names": names, "methods": methods,
              "frame0_static_vae": summarize(first), "wins": wins,
              "per_object": {**rows, "frame0_static_vae": first}}
    result["checks"] = checks(result)
    return result


def checks(result: dict) -> list[dict]:
    """The project's acceptance thresholds, relative to S = still PSNR and F = frame-0 PSNR (means over objects):
    each {"check", "value", "threshold", "pass"}; an interval threshold is [low, high]."""
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
             ge("generated PSNR >= mean-motion PSNR + 1", gen["psnr"], m["mean motion"]["psnr"] + 1.0),
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
    lines = [f"Held-out objects: {result['objects']}, frames 1..{result['frames'] - 1} (after the first), all views "
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
    lines += ["", f"Generated beats still in PSNR on {w['generated_beats_still_psnr']}/{n} objects, beats mean "
              f"motion in PSNR on {w['generated_beats_mean_motion_psnr']}/{n}, has a lower EPE than still on "
              f"{w['generated_lower_epe_than_still']}/{n}.", "",
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
    ap.add_argument("--list", type=Path, required=True, help="held-out sample names")
    ap.add_argument("--train-list", type=Path, required=True, help="training names (their latents give the mean motion)")
    ap.add_argument("--config", type=Path)
    ap.add_argument("--vae-config", type=Path)
    ap.add_argument("--num-frames", type=int)
    ap.add_argument("--limit", type=int, help="evaluate only the first N held-out objects")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    result = evaluate(args)
    command = "python scripts/evaluate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    table = markdown(result, command)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "metrics.md", lambda tmp: tmp.write_text(table), overwrite=True)
    atomic_write(args.out / "metrics.json", lambda tmp: tmp.write_text(json.dumps(result, indent=1)), overwrite=True)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
