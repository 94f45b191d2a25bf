"""The shipped model's training curves, from the runs' `log.jsonl` (docs/MODEL_CARD.md).

    python docs/training_curve.py --run "final=docs/shapes16_training/pretrain.jsonl,docs/shapes16_training/finetune.jsonl,docs/shapes16_training/continue.jsonl" \
        --run "min-SNR-5=docs/shapes16_training/v1_min_snr5_lr1e-3.jsonl" --out docs/shapes16_training/curve.png

Each `--run LABEL=LOG[,LOG...]` is one run; the logs of a run are chained (a later log's training
seconds continue from the earlier one's last). Plots the loss and the sample quality that
`flexikern train --eval-every` logged (FD and class accuracy of the static model, and of
`for_budget(0.6)` once the model is flexible) against training wall time, and prints the
evaluations as a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from flexikern.metrics import pyplot


def read_run(paths: list[str]) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of the chained logs, `minutes` of training time added."""
    train_rows, eval_rows, offset = [], [], 0.0
    for path in paths:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        rows = [r for r in rows if "train_seconds" in r]     # logs from before it was logged: no time axis
        if not rows:
            raise SystemExit(f"{path}: no rows with train_seconds (written by flexikern train since issue 15)")
        for r in rows:
            r = {**r, "minutes": (offset + r["train_seconds"]) / 60, "log": Path(path).stem}
            (eval_rows if "fd" in r else train_rows).append(r)
        offset += max(r["train_seconds"] for r in rows)
    return train_rows, eval_rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, help="LABEL=LOG[,LOG...]")
    p.add_argument("--out", required=True, help="figure path (.png)")
    args = p.parse_args()
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for i, spec in enumerate(args.run):
        label, _, paths = spec.partition("=")
        train_rows, eval_rows = read_run(paths.split(","))
        color = f"C{i}"
        axes[0].plot([r["minutes"] for r in train_rows], [r["loss"] for r in train_rows], color=color, lw=0.8,
                     label=label)
        for suffix, style, name in (("", "-o", "static"), ("_0.6", "--s", "for_budget(0.6)")):
            pts = [r for r in eval_rows if f"fd{suffix}" in r]
            if pts:
                xs = [r["minutes"] for r in pts]
                axes[1].plot(xs, [r[f"fd{suffix}"] for r in pts], style, color=color, ms=3, label=f"{label}, {name}")
                axes[2].plot(xs, [r[f"accuracy{suffix}"] for r in pts], style, color=color, ms=3,
                             label=f"{label}, {name}")
        print(f"\n{label}\n\n| log | step | training minutes | FD | accuracy | FD for_budget(0.6) | accuracy |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for r in eval_rows:
            print(f"| {r['log']} | {r['step']} | {r['minutes']:.1f} | {r['fd']:.0f} | {r['accuracy']:.2f} | "
                  f"{r.get('fd_0.6', float('nan')):.0f} | {r.get('accuracy_0.6', float('nan')):.2f} |")
    axes[0].set(xlabel="training minutes", ylabel="training loss (--snr-gamma: weighted)", yscale="log",
                title="training loss")
    axes[1].set(xlabel="training minutes", ylabel="FD (--eval-every: 100 samples, guidance 5)", yscale="log",
                title="sample FD during training")
    axes[2].set(xlabel="training minutes", ylabel="class accuracy", title="sample class accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
