"""Train, flexify and evaluate the tiny shipped text-to-image and video FlexiDiTs.

    python benchmarks/t2i_video_examples.py t2i   [--pretrain-min 6 --distill-min 3 --out runs/t2i]
    python benchmarks/t2i_video_examples.py video [--pretrain-min 6 --distill-min 3 --out runs/video]
    python benchmarks/t2i_video_examples.py t2i --eval-only       # re-evaluate the shipped asset

Data are generated (`_captioned.py` beside this script: captioned shapes, captioned clips of moving
shapes, a fixed random "text encoder"). Steps: pre-train the static model (DiT's diffusion loss, 10% of
captions replaced by the learned null caption), flexify with the paper's LoRA recipe, distil the
weak sizes from the frozen original, save under `flexikern/assets/{t2i,video}/`, then sample with
static and weak-first schedules at several FLOPs budgets and write FD (in the feature space of
`flexikern.metrics`' shapes classifier, per frame for video) and, for video, a temporal
consistency measure to `benchmarks/results/cpu/{t2i,video}/`.

The loop here is small on purpose: `flexikern.train.train` takes class labels and image-shaped
data; its losses, EMA and diffusion are reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from flexikern.diffusion import GaussianDiffusion, Guidance, Schedule, sample
from flexikern.models import FlexiLatte, FlexiPixArt, TextCondition
from flexikern.train.losses import diffusion_loss, distillation_loss
from flexikern.train.trainer import EMA

from _captioned import SHAPES_VERSION, TinyTextEncoder, captioned_shapes, moving_shapes   # beside this script

ROOT = Path(__file__).resolve().parents[1]
TEXT = dict(channels=32, text_len=8)


def build(kind: str):
    common = dict(input_size=16, in_channels=3, hidden_size=64, num_heads=4, caption_channels=TEXT["channels"],
                  text_len=TEXT["text_len"], learn_sigma=False)
    if kind == "t2i":
        return FlexiPixArt(patch_size=2, depth=3, **common)
    return FlexiLatte(patch_size=(1, 2, 2), num_frames=4, depth=3, **common)


def init_from_image_model(video, image) -> None:
    """Latte's recipe: spatial blocks, embedders and output from a text-to-image model (its ORIGINAL
    size tensors; LoRA and weak sizes are not copied); temporal blocks start as the identity (zero
    output projections), so at init the video model is the image model applied per frame, plus
    the temporal positions Latte adds to the stream."""
    state = {k: v for k, v in image.state_dict().items() if "lora_" not in k}
    key_2d, key_3d = "x".join(map(str, image.original_patch_size)), "x".join(map(str, video.original_patch_size))
    ours = video.state_dict()
    for name, value in state.items():
        target = name.replace("." + key_2d, "." + key_3d) if name.endswith(key_2d) else name
        if target not in ours:
            continue
        ours[target] = value[:, :, None] if target == f"x_embedder.weight.{key_3d}" else value
    video.load_state_dict(ours)
    with torch.no_grad():
        for block in video.temporal_blocks:
            for linear in (block.attn.proj, block.mlp.fc2):
                linear.weight.zero_()
                linear.bias.zero_()


def weak_sizes(kind: str):
    return [(2, 2), (4, 4)] if kind == "t2i" else [(1, 2, 2), (2, 2, 2), (1, 4, 4)]


def dataset(kind: str, n: int, seed: int):
    x, captions, labels = (captioned_shapes(n, 16, seed) if kind == "t2i" else moving_shapes(n, 4, 16, seed))
    return x, TinyTextEncoder(**TEXT).encode(captions), labels, captions


def with_null(model, cond: TextCondition, drop: torch.Tensor) -> TextCondition:
    """Rows where `drop` is set get the learned null caption (classifier-free guidance training)."""
    null = model.y_embedder.y_embedding[None].expand(len(cond), -1, -1)
    embeds = torch.where(drop[:, None, None], null, cond.embeds)
    mask = torch.where(drop[:, None], torch.ones_like(cond.mask), cond.mask)
    return TextCondition(embeds, mask)


def fit(model, x, cond, minutes: float, recipe: str, lr: float, batch: int, log: Path, seed: int = 0):
    """Train for a wall-clock budget: "pretrain" (diffusion loss) or "distill" (weak sizes from the original)."""
    diffusion = GaussianDiffusion.dit(1000)
    g = torch.Generator().manual_seed(seed)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    # A short run: a slow EMA would still hold much of the random init (0.999^800 = 0.45).
    ema = EMA(model, 0.99) if recipe == "pretrain" else None
    weak = [p for p in model.patch_sizes if p != model.original_patch_size]
    model.train()
    start, step, losses = time.time(), 0, []
    with open(log, "a") as f:
        while time.time() - start < minutes * 60:
            idx = torch.randint(0, len(x), (batch,), generator=g)
            x0, c = x[idx], cond[idx]
            t = torch.randint(0, 1000, (batch,), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            x_t = diffusion.q_sample(x0, t, noise)
            if recipe == "pretrain":
                c = with_null(model, c, torch.rand(batch, generator=g) < 0.1)
                loss = diffusion_loss(model(x_t, t, c), x0, x_t, t, noise, diffusion).mean()
            else:
                which = torch.randint(0, len(weak), (batch,), generator=g)
                loss = 0.0
                for i, p in enumerate(weak):
                    rows = (which == i).nonzero().squeeze(1)
                    if rows.numel():
                        with torch.no_grad():
                            target = model(x_t[rows], t[rows], c[rows])
                        out = model(x_t[rows], t[rows], c[rows], patch_size=p)
                        loss = loss + distillation_loss(out, target, model.in_channels).sum() / batch
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if ema is not None:
                ema.update(model)
            losses.append(float(loss.detach()))
            step += 1
            if step % 50 == 0:
                f.write(json.dumps({"recipe": recipe, "step": step, "loss": sum(losses) / len(losses),
                                    "seconds": round(time.time() - start, 1)}) + "\n")
                f.flush()
                losses = []
    if ema is not None:
        model.load_state_dict(ema.model.state_dict())
    return model.eval(), step


def classifier(out: Path):
    """The shapes feature classifier of the examples' data (version 1 of the shapes geometry: the
    shipped `shapes_classifier_v1.safetensors`), else trained once and cached."""
    from flexikern.datasets import make_shapes
    from flexikern.metrics import ASSETS, ShapesClassifier, train_classifier
    shipped = ASSETS / "shapes_classifier_v1.safetensors"
    if shipped.exists():
        return ShapesClassifier.load(shipped)
    cache = out / "classifier.pt"
    if cache.exists():
        clf = ShapesClassifier()
        clf.load_state_dict(torch.load(cache, weights_only=True))
        return clf.eval()
    x, y = make_shapes(8000, size=16, seed=0, version=SHAPES_VERSION)
    clf = train_classifier(torch.from_numpy(x), torch.from_numpy(y), epochs=2)
    torch.save(clf.state_dict(), cache)
    return clf


def frames(x: torch.Tensor) -> torch.Tensor:
    """Images as they are; clips (N, C, F, H, W) -> their frames (N*F, C, H, W)."""
    return x if x.dim() == 4 else x.transpose(1, 2).reshape(-1, *x.shape[1:2], *x.shape[3:])


def temporal_consistency(clf, x: torch.Tensor) -> float:
    """Mean feature distance between consecutive frames (lower = smoother; compare with real clips)."""
    from flexikern.metrics import classify
    n, c, f, h, w = x.shape
    feats = torch.from_numpy(classify(clf, frames(x))[0]).reshape(n, f, -1)
    return float((feats[:, 1:] - feats[:, :-1]).norm(dim=-1).mean())


def evaluate(kind: str, model, out: Path, n: int, steps: int, seeds, scale: float) -> list[dict]:
    from flexikern.metrics import classify, feature_stats, frechet_distance
    clf = classifier(out)
    real, _, _, _ = dataset(kind, 2000, seed=1)
    mu_r, s_r = feature_stats(classify(clf, frames(real))[0])
    _, cond, _, _ = dataset(kind, n, seed=2)      # held-out captions to sample from
    powerful = model.original_patch_size
    schedules = [("static", Schedule.static(steps, powerful), None)]
    for weak in [p for p in model.patch_sizes if p != powerful]:
        for level in (0.8, 0.6, 0.5, 0.4, 0.3):
            try:
                # x/y, as when the committed curves were made (before for_budget's default was x/x)
                flexi = Schedule.for_budget(model, steps, level, weak=weak, equal_branches=False)
                schedules.append(("flexi", flexi, weak))
            except ValueError:
                pass
    if kind == "video":   # three phases: spatially weak, temporally weak, powerful
        for a, b in ((8, 6), (10, 6), (12, 4), (14, 4)):
            sizes = [(1, 4, 4)] * a + [(2, 2, 2)] * b + [powerful] * (steps - a - b)
            schedules.append(("flexi_3phase", Schedule.from_list(sizes), "1x4x4+2x2x2"))
    for k in (round(0.6 * steps), round(0.4 * steps)):
        schedules.append(("fewer_steps", Schedule.static(k, powerful), None))
    rows = []
    other, _, _, _ = dataset(kind, n, seed=3)    # real data of the sample count: the FD floor
    rows.append({"method": "real data", "weak": None, "schedule": None, "relative_flops": 0.0,
                 "fd": frechet_distance(*feature_stats(classify(clf, frames(other))[0]), mu_r, s_r),
                 "fd_std": 0.0})
    real_tc = temporal_consistency(clf, real) if kind == "video" else None
    if kind == "video":
        rows[0].update(temporal_consistency=temporal_consistency(clf, other), temporal_consistency_real=real_tc)
    for method, sched, weak in schedules:
        fds, tcs = [], []
        for seed in seeds:
            with torch.no_grad():
                x = sample(model, cond, sched, Guidance(scale, "flexi"), sampler="ddim", seed=seed * 100_003,
                           progress=False).clamp(-1, 1)
            mu, s = feature_stats(classify(clf, frames(x))[0])
            fds.append(frechet_distance(mu, s, mu_r, s_r))
            if kind == "video":
                tcs.append(temporal_consistency(clf, x))
        rel = sched.relative_flops(model) * sched.num_steps / steps
        row = {"method": method, "weak": (list(weak) if isinstance(weak, tuple) else weak), "schedule": repr(sched),
               "relative_flops": round(rel, 4), "fd": float(np.mean(fds)), "fd_std": float(np.std(fds))}
        if kind == "video":
            row.update(temporal_consistency=float(np.mean(tcs)), temporal_consistency_real=real_tc)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def write(kind: str, rows: list[dict], meta: dict) -> None:
    res = ROOT / "benchmarks" / "results" / "cpu" / kind
    res.mkdir(parents=True, exist_ok=True)
    (res / "eval.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    extra = kind == "video"
    lines = [f"# {kind}: FD vs relative FLOPs ({meta['steps']} DDIM steps, guidance {meta['guidance_scale']} "
             f"'flexi', {meta['num_samples']} samples x {len(meta['seeds'])} seeds)", "",
             "| method | weak | relative FLOPs | FD | FD std |" + (" temporal consistency (real: %.3f) |"
                                                                  % rows[0]["temporal_consistency_real"] if extra else ""),
             "|---|---|---|---|---|" + ("---|" if extra else "")]
    for r in sorted(rows, key=lambda r: (r["method"] != "static", r["method"], str(r["weak"]), -r["relative_flops"])):
        lines.append(f"| {r['method']} | {r['weak']} | {r['relative_flops']:.3f} | {r['fd']:.3f} | {r['fd_std']:.3f} |"
                     + (f" {r['temporal_consistency']:.3f} |" if extra else ""))
    (res / "eval.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for r in rows:
            if r["method"] == "real data":
                ax.axhline(r["fd"], color="gray", ls="--", lw=1, label="real data (floor)")
        for key in sorted({(r["method"], str(r["weak"])) for r in rows if r["method"] != "real data"}):
            pts = sorted((r["relative_flops"], r["fd"]) for r in rows if (r["method"], str(r["weak"])) == key)
            ax.plot(*zip(*pts), "o-", label=f"{key[0]} {key[1] if key[1] != 'None' else ''}")
        ax.set_xlabel("relative FLOPs")
        ax.set_ylabel("FD (shapes classifier features)")
        ax.set_title(kind)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(res / "eval.png", dpi=100)
    except Exception as e:  # pragma: no cover - plotting is optional
        print(f"plot skipped: {e}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=("t2i", "video"))
    ap.add_argument("--out", default=None, help="run folder (default runs/<kind>)")
    ap.add_argument("--pretrain-min", type=float, default=6.0)
    ap.add_argument("--distill-min", type=float, default=3.0)
    ap.add_argument("--train-size", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=None, help="t2i 48, video 32")
    ap.add_argument("--lora-rank", type=int, default=None, help="t2i 16, video 8 (LoRA FLOPs matter at width 64)")
    ap.add_argument("--eval-only", action="store_true", help="evaluate the shipped asset")
    ap.add_argument("--samples", type=int, default=None, help="samples per point (t2i 300, video 150)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--guidance-scale", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.samples = args.samples or (300 if args.kind == "t2i" else 150)
    args.batch = args.batch or (48 if args.kind == "t2i" else 32)
    args.lora_rank = args.lora_rank or (16 if args.kind == "t2i" else 8)
    torch.manual_seed(0)
    out = Path(args.out or ROOT / "runs" / args.kind)
    out.mkdir(parents=True, exist_ok=True)
    asset = ROOT / "flexikern" / "assets" / args.kind
    cls = FlexiPixArt if args.kind == "t2i" else FlexiLatte
    meta = {"steps": args.steps, "guidance_scale": args.guidance_scale, "num_samples": args.samples,
            "seeds": args.seeds, "device": "cpu", "torch": torch.__version__}
    if args.eval_only:
        model = cls.from_pretrained(asset).eval()
        meta.update(json.loads((asset / "training.json").read_text()))
    else:
        x, cond, _, _ = dataset(args.kind, args.train_size, seed=0)
        model = build(args.kind)
        image_asset = ROOT / "flexikern" / "assets" / "t2i"
        if args.kind == "video" and (image_asset / "model.safetensors").exists():
            init_from_image_model(model, FlexiPixArt.from_pretrained(image_asset))
        log = out / "log.jsonl"
        log.write_text("")
        model, n_pre = fit(model, x, cond, args.pretrain_min, "pretrain", 1e-3, args.batch, log)
        model.flexify(weak_sizes(args.kind), adapter="lora", lora_rank=args.lora_rank)
        model, n_dist = fit(model, x, cond, args.distill_min, "distill", 1e-3, args.batch, log, seed=1)
        model.save_pretrained(asset)
        training = {"pretrain_steps": n_pre, "distill_steps": n_dist, "pretrain_minutes": args.pretrain_min,
                    "distill_minutes": args.distill_min, "batch": args.batch, "train_size": args.train_size,
                    "lora_rank": args.lora_rank,
                    "command": f"python benchmarks/t2i_video_examples.py {args.kind} --pretrain-min "
                               f"{args.pretrain_min} --distill-min {args.distill_min} --batch {args.batch} "
                               f"--lora-rank {args.lora_rank}"}
        (asset / "training.json").write_text(json.dumps(training, indent=2))
        meta.update(training)
    rows = evaluate(args.kind, model, out, args.samples, args.steps, args.seeds, args.guidance_scale)
    write(args.kind, rows, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
