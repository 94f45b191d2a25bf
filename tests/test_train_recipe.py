"""The shipped model's training recipe: Min-SNR-gamma loss weighting, sample quality logged during
training (`--eval-every`), training seconds carried across resumes, checkpoints from before a
setting existed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from flexikern.cli import main
from flexikern.datasets import make_shapes
from flexikern.diffusion import GaussianDiffusion, Guidance
from flexikern.models import FlexiDiT
from flexikern.train import TensorData, TrainConfig, diffusion_loss, load_checkpoint, save_checkpoint, train
from flexikern.train.losses import min_snr_weight

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=3,
            learn_sigma=False)


def tiny_model() -> FlexiDiT:
    torch.manual_seed(0)
    return FlexiDiT(**TINY)


def tiny_data() -> TensorData:
    return TensorData(*make_shapes(48, size=8, seed=3, num_classes=3))


def config(tmp_path: Path, name: str, **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp_path / name), steps=6, batch_size=8, lr=2e-3, log_every=2, ckpt_every=2,
                ema_decay=0.9, progress=False)
    return TrainConfig(**{**base, **kw})


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------ Min-SNR
def test_min_snr_weight_matches_diffusers_compute_snr():
    diffusers = pytest.importorskip("diffusers")
    from diffusers.training_utils import compute_snr
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                                        beta_schedule="linear")
    t = torch.tensor([0, 1, 17, 150, 499, 500, 998, 999])
    snr = compute_snr(scheduler, t)
    expected = torch.stack([snr, 5.0 * torch.ones_like(snr)], 1).min(1)[0] / snr   # diffusers' train_*.py
    got = min_snr_weight(GaussianDiffusion.dit(1000), t, 5.0)
    torch.testing.assert_close(got, expected.float(), rtol=1e-3, atol=0)   # diffusers: float32 alphas
    assert got[0] < 1e-3 and got[-1] == 1     # clean steps down-weighted, noisy steps unchanged


def test_diffusion_loss_with_snr_gamma_is_the_weighted_mse():
    d = GaussianDiffusion.dit(1000)
    g = torch.Generator().manual_seed(0)
    x0, noise, out = (torch.randn(5, 3, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([3, 40, 200, 600, 990])
    x_t = d.q_sample(x0, t, noise)
    plain = diffusion_loss(out, x0, x_t, t, noise, d)
    torch.testing.assert_close(plain, ((out - noise) ** 2).flatten(1).mean(1))
    alpha_bar = d.alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    weighted = diffusion_loss(out, x0, x_t, t, noise, d, snr_gamma=2.0)
    torch.testing.assert_close(weighted, plain * (snr.clamp(max=2.0) / snr).float())


def test_snr_gamma_is_checked_and_reaches_the_loss(tmp_path):
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="snr_gamma"):
            config(tmp_path, "x", snr_gamma=bad)
    with pytest.raises(ValueError, match="distill"):
        config(tmp_path, "x", recipe="distill", snr_gamma=5.0)
    data = tiny_data()
    train(tiny_model(), data, config(tmp_path, "plain", steps=2))
    train(tiny_model(), data, config(tmp_path, "snr", steps=2, snr_gamma=1.0))
    # Same batches, noise and initial weights: only the weighting differs (and it lowers the loss).
    assert rows(tmp_path / "snr")[0]["loss"] < rows(tmp_path / "plain")[0]["loss"]


def test_a_checkpoint_from_before_a_setting_existed_resumes(tmp_path):
    """A setting added later (snr_gamma) ran at its default in an older checkpoint: no refusal."""
    data = tiny_data()
    train(tiny_model(), data, config(tmp_path, "run", steps=6, max_steps=4))
    ckpt_path = tmp_path / "run" / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path)
    del ckpt["settings"]["snr_gamma"], ckpt["settings"]["lr_schedule"]
    save_checkpoint(ckpt_path, ckpt)
    train(tiny_model(), data, config(tmp_path, "run", steps=6))          # resumes, no refusal
    assert load_checkpoint(ckpt_path)["step"] == 6
    with pytest.raises(ValueError, match="snr_gamma None -> 5.0"):       # a real change is still named
        train(tiny_model(), data, config(tmp_path, "run", steps=6, snr_gamma=5.0))


# ------------------------------------------------------------------------------------ learning rate
def test_cosine_learning_rate_after_warmup(tmp_path):
    from flexikern.train.trainer import learning_rate
    c = config(tmp_path, "x", steps=110, lr=1e-3, warmup_steps=10, lr_schedule="cosine")
    got = [learning_rate(c, s) for s in (0, 9, 10, 60, 109)]
    assert got[:3] == pytest.approx([1e-4, 1e-3, 1e-3]) and got[3] == pytest.approx(5e-4)
    assert got[4] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 99 / 100)))
    constant = config(tmp_path, "x", steps=110, lr=1e-3, warmup_steps=10)
    assert [learning_rate(constant, s) for s in (0, 10, 109)] == pytest.approx([1e-4, 1e-3, 1e-3])
    with pytest.raises(ValueError, match="lr_schedule='linear'"):
        config(tmp_path, "x", lr_schedule="linear")
    run = config(tmp_path, "run", steps=6, lr_schedule="cosine")
    train(tiny_model(), tiny_data(), run)
    lrs = [r["lr"] for r in rows(tmp_path / "run")]          # the optimiser ran the schedule
    assert lrs == pytest.approx([learning_rate(run, s) for s in (1, 3, 5)])   # log rows after steps 2, 4, 6


# ------------------------------------------------------------------------------------ evaluation
def test_evaluate_logs_rows_without_changing_the_run(tmp_path):
    data = tiny_data()
    seen = []

    def evaluate(model):
        assert not model.training
        seen.append(model.training)
        torch.randn(100)                          # consumes the global RNG: must not change the run
        return {"score": float(len(seen))}

    ema_a = train(tiny_model(), data, config(tmp_path, "a"), evaluate=evaluate, eval_every=3)
    ema_b = train(tiny_model(), data, config(tmp_path, "b"))
    for (k, va), vb in zip(ema_a.state_dict().items(), ema_b.state_dict().values()):
        assert torch.equal(va, vb), k
    evals = [r for r in rows(tmp_path / "a") if "score" in r]
    assert [(r["step"], r["score"]) for r in evals] == [(3, 1.0), (6, 2.0)]
    assert all(r["train_seconds"] > 0 for r in evals)


def test_evaluate_runs_after_the_checkpoint_at_the_last_step_and_is_checked(tmp_path):
    data = tiny_data()

    def fails(model):
        raise RuntimeError("evaluation failed")

    with pytest.raises(RuntimeError, match="evaluation failed"):
        train(tiny_model(), data, config(tmp_path, "a", steps=4), evaluate=fails, eval_every=4)
    assert load_checkpoint(tmp_path / "a" / "checkpoint.pt")["step"] == 4    # the step's work is kept
    train(tiny_model(), data, config(tmp_path, "b", steps=7), evaluate=lambda m: {"step": -1, "x": 1.0},
          eval_every=5)
    assert [(r["step"], r["x"]) for r in rows(tmp_path / "b") if "x" in r] == [(5, 1.0), (7, 1.0)]
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match=f"eval_every={bad}"):
            train(tiny_model(), data, config(tmp_path, "c"), evaluate=lambda m: {}, eval_every=bad)


def test_training_seconds_accumulate_across_a_resume(tmp_path):
    data = tiny_data()
    train(tiny_model(), data, config(tmp_path, "run", steps=6, max_steps=4))
    first = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["train_seconds"]
    train(tiny_model(), data, config(tmp_path, "run", steps=6))
    log = rows(tmp_path / "run")
    assert first > 0 and log[-1]["step"] == 6 and log[-1]["train_seconds"] > first
    assert [r["train_seconds"] for r in log] == sorted(r["train_seconds"] for r in log)


def test_cli_eval_every_logs_fd_and_accuracy(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--num-images", "40", "--hidden-size", "32", "--depth", "1",
            "--num-heads", "2", "--steps", "2", "--batch-size", "4", "--threads", "1", "--no-progress",
            "--snr-gamma", "5", "--eval-every", "2", "--eval-samples", "4", "--out", str(out)]
    assert main(args) == 0
    evals = [r for r in rows(out) if "fd" in r]
    assert len(evals) == 1 and evals[0]["step"] == 2 and 0 <= evals[0]["accuracy"] <= 1 and evals[0]["fd"] > 0
    assert json.loads((out / "train_config.json").read_text())["snr_gamma"] == 5.0
    # A flexible model also logs the default flexible schedule's quality.
    ft = tmp_path / "ft"
    assert main(["finetune", "--model", str(out / "ema"), "--recipe", "shared", "--num-images", "40",
                 "--steps", "2", "--batch-size", "4", "--threads", "1", "--no-progress",
                 "--eval-every", "2", "--eval-samples", "4", "--out", str(ft)]) == 0
    evals = [r for r in rows(ft) if "fd" in r]
    assert len(evals) == 1 and {"fd", "accuracy", "fd_0.6", "accuracy_0.6"} <= set(evals[0])
    assert evals[0]["eval_guidance"] == 5.0


def test_cli_eval_guidance_is_the_scale_sampled_with(tmp_path, monkeypatch, capsys):
    from flexikern import metrics
    seen = []
    real_generate = metrics.generate
    monkeypatch.setattr(metrics, "generate", lambda model, schedule, guidance, *a, **k: (
        seen.append(guidance), real_generate(model, schedule, guidance, *a, **k))[1])
    loop = ["--num-images", "40", "--steps", "2", "--batch-size", "4", "--threads", "1", "--no-progress",
            "--eval-every", "2", "--eval-samples", "4"]
    assert main(["train", "--hidden-size", "32", "--depth", "1", "--num-heads", "2", *loop, "--eval-guidance", "1.5",
                 "--out", str(tmp_path / "a")]) == 0
    assert seen == [Guidance(1.5, "flexi")] and [r["eval_guidance"] for r in rows(tmp_path / "a") if "fd" in r] == [1.5]
    # Unguided evaluation needs no null class; guided evaluation of such a model is refused up front.
    FlexiDiT(input_size=16, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=10,
             learn_sigma=False, class_dropout_prob=0.0).save_pretrained(tmp_path / "no_null")
    tune = ["finetune", "--model", str(tmp_path / "no_null"), "--recipe", "shared", "--class-dropout", "0", *loop]
    with pytest.raises(SystemExit) as e:
        main([*tune, "--out", str(tmp_path / "c")])
    assert e.value.code == 2 and "pass --eval-guidance 1" in capsys.readouterr().err
    assert not (tmp_path / "c" / "checkpoint.pt").exists()
    assert main([*tune, "--eval-guidance", "1", "--out", str(tmp_path / "d")]) == 0
    assert not seen[-1].enabled


def test_cli_eval_every_needs_the_shapes_data(tmp_path, capsys):
    TensorData(*make_shapes(8, size=8, seed=0, num_classes=3)).save_npz(tmp_path / "d.npz")
    for extra, needle in ((["--data", str(tmp_path / "d.npz"), "--eval-every", "5"], "needs --data shapes"),
                          (["--eval-every", "5", "--eval-samples", "1"], "at least 2 samples"),
                          (["--eval-every", "50"], "pass --eval-every 10 or less"),
                          (["--eval-every", "5", "--image-size", "8"], "16x16 images of 10 classes"),
                          (["--lr-schedule", "cosine", "--warmup-steps", "10"], "never decay"),
                          (["--snr-gamma", "0"], "--snr-gamma")):
        with pytest.raises(SystemExit) as e:
            main(["train", "--steps", "10", "--num-images", "20", "--hidden-size", "32", "--depth", "1",
                  "--num-heads", "2", "--out", str(tmp_path / "r"), *extra])
        assert e.value.code == 2
        assert needle in capsys.readouterr().err
