"""flexikern.train: recipes, losses, data sources, atomic checkpoints, kill-and-resume, 2-process DDP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flexikern.datasets import make_shapes
from flexikern.diffusion import GaussianDiffusion
from flexikern.models import FlexiDiT
from flexikern.train import (BatchOrder, TensorData, TrainConfig, diffusion_loss, image_folder,
                             load_checkpoint, save_checkpoint, teacher_samples, train, vlb_term)

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
            num_classes=3, learn_sigma=False)


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster here


def tiny_model(seed: int = 0, trained: bool = False, **overrides) -> FlexiDiT:
    """A tiny DiT; `trained=True` perturbs DiT's zero-initialised layers so that it predicts
    something (a stand-in for a pre-trained teacher: at init every output is exactly zero)."""
    torch.manual_seed(seed)
    model = FlexiDiT(**{**TINY, **overrides})
    if trained:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return model


def tiny_data(n: int = 96) -> TensorData:
    return TensorData(*make_shapes(n, size=8, seed=3, num_classes=3))


def losses(out_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]     # evaluation rows have none


def cfg(tmp_path: Path, name: str, **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp_path / name), steps=40, batch_size=16, lr=2e-3, log_every=5, ckpt_every=20,
                ema_decay=0.9, progress=False)
    return TrainConfig(**{**base, **kw})


# ------------------------------------------------------------------------------------ recipes
@pytest.mark.parametrize("recipe,adapter", [("pretrain", None), ("shared", "shared"), ("distill", "lora")])
def test_recipes_reduce_the_loss(tmp_path, recipe, adapter):
    model = tiny_model(trained=adapter is not None)
    if adapter:
        model.flexify([2, 4], adapter=adapter, lora_rank=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema = train(model, tiny_data(), cfg(tmp_path, recipe, recipe=recipe))
    log = losses(tmp_path / recipe)
    assert log[-1] < 0.8 * log[0], log
    if recipe == "distill":   # LoRA: the base (and so the powerful mode) is untouched
        for k, v in model.state_dict().items():
            if "lora" not in k and "4x4" not in k:
                assert torch.equal(v, before[k]), k
    rows = [json.loads(line) for line in (tmp_path / recipe / "log.jsonl").read_text().splitlines()]
    keys = {"loss_2x2", "loss_4x4"} if recipe == "shared" else ({"loss_4x4"} if recipe == "distill" else {"loss_2x2"})
    assert keys <= set(rows[0])
    assert (tmp_path / recipe / "ema" / "model.safetensors").exists()
    reloaded = FlexiDiT.from_pretrained(tmp_path / recipe / "ema")
    for k, v in ema.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k])


def test_distill_with_shared_adapter_uses_a_frozen_copy(tmp_path):
    model = tiny_model(trained=True).flexify([2, 4], adapter="shared")
    teacher = tiny_model(trained=True)
    train(model, tiny_data(), cfg(tmp_path, "d", recipe="distill", steps=10))
    # The target is the original at p=2: the frozen copy; the trained model's p=2 mode moved on.
    x, t, y = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,)), torch.tensor([0, 1, 2, 0])
    assert not torch.allclose(model(x, t, y, patch_size=2), teacher(x, t, y))


def test_distill_needs_a_weak_size(tmp_path):
    with pytest.raises(ValueError, match="weak patch size"):
        train(tiny_model(), tiny_data(), cfg(tmp_path, "x", recipe="distill"))


def test_config_rejects_bad_values(tmp_path):
    with pytest.raises(ValueError, match="recipe"):
        TrainConfig(out_dir=str(tmp_path), recipe="nope")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(out_dir=str(tmp_path), batch_size=0)
    with pytest.raises(ValueError, match="images are"):
        train(tiny_model(), TensorData(torch.randn(8, 3, 16, 16), torch.zeros(8, dtype=torch.long)),
              cfg(tmp_path, "bad"))


# ------------------------------------------------------------------------------------ losses
def test_vlb_is_zero_for_the_true_posterior_and_learn_sigma_loss_trains(tmp_path):
    d = GaussianDiffusion.dit(1000)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 10, 500, 999])
    x_t = d.q_sample(x0, t, noise)
    # eps = the true noise gives the true posterior mean; v = -1 gives the (clipped) posterior variance.
    kl = vlb_term(d, x0, x_t, t, noise, -torch.ones_like(x0))
    assert kl.abs().max() < 1e-4, kl
    worse = vlb_term(d, x0, x_t, t, noise + 0.1, -torch.ones_like(x0))
    assert (worse > kl).all()
    out = torch.cat([noise, -torch.ones_like(x0)], 1)
    assert torch.allclose(diffusion_loss(out, x0, x_t, t, noise, d), kl, atol=1e-6)
    model = tiny_model(learn_sigma=True)
    train(model, tiny_data(), cfg(tmp_path, "ls", steps=30))
    log = losses(tmp_path / "ls")
    assert all(np.isfinite(log)) and log[-1] < log[0]


# ------------------------------------------------------------------------------------ data
def test_batch_order_is_a_function_of_the_step():
    order = BatchOrder(10, seed=5)
    first_epoch = torch.cat([order.indices(s, 5) for s in range(2)])
    assert sorted(first_epoch.tolist()) == list(range(10))
    again = BatchOrder(10, seed=5)
    assert torch.equal(again.indices(3, 5), order.indices(3, 5))
    assert torch.equal(order.indices(1, 4)[2:], order.indices(3, 2))   # same positions 6..7
    spans = torch.cat([order.indices(s, 3) for s in range(4)])     # 12 positions: epoch 0 then 1
    assert torch.equal(spans[:10], order._perm(0)) and torch.equal(spans[10:], order._perm(1)[:2])


def test_tensor_data_npz_and_image_folder(tmp_path):
    from PIL import Image
    x, y = make_shapes(6, size=8, seed=1, num_classes=3)
    data = TensorData(x, y)
    data.save_npz(tmp_path / "d.npz")
    back = TensorData.from_npz(tmp_path / "d.npz")
    assert torch.equal(back.x, data.x) and torch.equal(back.y, data.y)
    np.savez(tmp_path / "bad.npz", images=x)
    with pytest.raises(ValueError, match="labels"):
        TensorData.from_npz(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="integer labels"):
        TensorData(x, y.astype(np.float32))
    for i, name in enumerate(["b_cls", "a_cls"]):
        (tmp_path / "img" / name).mkdir(parents=True)
        for j in range(2):
            arr = ((x[2 * i + j].transpose(1, 2, 0) + 1) * 127.5).round().astype(np.uint8)
            Image.fromarray(arr).resize((12, 12)).save(tmp_path / "img" / name / f"{j}.png")
    (tmp_path / "img" / "a_cls" / "notes.txt").write_text("not an image")
    folder = image_folder(tmp_path / "img", size=8)
    assert folder.x.shape == (4, 3, 8, 8) and folder.y.tolist() == [0, 0, 1, 1]   # sorted class names
    assert folder.x.min() >= -1 and folder.x.max() <= 1
    with pytest.raises(ValueError, match="no class subfolders"):
        image_folder(tmp_path / "img" / "a_cls")


def test_data_free_distillation_from_cached_teacher_samples(tmp_path):
    model = tiny_model(trained=True).flexify([2, 4], adapter="lora", lora_rank=4)
    cache = tmp_path / "teacher.npz"
    data = teacher_samples(model, 12, steps=3, cache=cache, seed=1)
    assert data.x.shape == (12, 3, 8, 8) and data.y.tolist() == [i % 3 for i in range(12)]
    assert cache.exists()
    mtime = cache.stat().st_mtime_ns
    again = teacher_samples(model, 12, steps=3, cache=cache, seed=1)
    assert torch.equal(again.x, data.x) and cache.stat().st_mtime_ns == mtime   # reused, not resampled
    train(model, data, cfg(tmp_path, "df", recipe="distill", steps=30, batch_size=12))
    log = losses(tmp_path / "df")
    assert log[-1] < log[0]


# ------------------------------------------------------------------------------------ checkpoints
def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def broken_save(obj, f, *a, **k):
        f.write(b"partial garbage")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    ckpt = load_checkpoint(path)                       # the old checkpoint, intact
    assert ckpt["step"] == 1 and torch.equal(ckpt["w"], torch.ones(3))
    save_checkpoint(path, {"step": 3, "w": torch.zeros(3)})
    assert load_checkpoint(path)["step"] == 3


# ------------------------------------------------------------------------------------ processes
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "flexikern", *args]


def _env() -> dict[str, str]:
    # CPU processes (gloo) even on a GPU machine: these tests check the CPU path, and two ranks
    # on one GPU would fail.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0", CUDA_VISIBLE_DEVICES="")
    env.pop("WORLD_SIZE", None)
    return env


def _train_args(out: Path, data: Path, steps: int) -> list[str]:
    return ["train", "--data", str(data), "--patch-size", "2", "--hidden-size", "32", "--depth", "2",
            "--num-heads", "2", "--steps", str(steps), "--batch-size", "8", "--lr", "1e-3", "--ckpt-every", "3",
            "--log-every", "1", "--threads", "1", "--no-progress", "--out", str(out)]


def _state(out: Path) -> dict:
    return load_checkpoint(out / "checkpoint.pt")


def _assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        for k, v in a[part].items():
            assert torch.equal(v, b[part][k]), (part, k)
    for k, v in a["opt"]["state"].items():
        for name, tensor in v.items():
            assert torch.equal(torch.as_tensor(tensor), torch.as_tensor(b["opt"]["state"][k][name])), (k, name)
    assert torch.equal(a["rng"]["generator"], b["rng"]["generator"])


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    TensorData(*make_shapes(40, size=8, seed=0, num_classes=3)).save_npz(tmp_path / "d.npz")
    steps = 60
    full = subprocess.run(_cli(*_train_args(tmp_path / "full", tmp_path / "d.npz", steps)), env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert full.returncode == 0, full.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*_train_args(out, tmp_path / "d.npz", steps)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    try:
        while time.time() < deadline:    # kill once a few checkpoints exist, mid-way through the run
            log = out / "log.jsonl"
            if log.exists() and len(log.read_text().splitlines()) >= 10:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed_at = _state(out)["step"]
    assert 3 <= killed_at < steps, killed_at
    resumed = subprocess.run(_cli(*_train_args(out, tmp_path / "d.npz", steps)), env=_env(),
                             capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_same_state(_state(out), _state(tmp_path / "full"))
    assert losses(out) == losses(tmp_path / "full")


def test_max_steps_interruption_then_resume_is_bit_exact(tmp_path):
    model = tiny_model().flexify([2, 4], adapter="shared")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    data = tiny_data()
    train(model, data, cfg(tmp_path, "full", recipe="shared", steps=12, ckpt_every=4))
    model2 = tiny_model().flexify([2, 4], adapter="shared")
    model2.load_state_dict(base)
    train(model2, data, cfg(tmp_path, "part", recipe="shared", steps=12, ckpt_every=4, max_steps=6))
    assert _state(tmp_path / "part")["step"] == 4            # the last checkpoint before the "crash"
    model3 = tiny_model(seed=123).flexify([2, 4], adapter="shared")   # fresh process: other weights
    train(model3, data, cfg(tmp_path, "part", recipe="shared", steps=12, ckpt_every=4))
    _assert_same_state(_state(tmp_path / "part"), _state(tmp_path / "full"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process(tmp_path):
    TensorData(*make_shapes(64, size=8, seed=0, num_classes=3)).save_npz(tmp_path / "d.npz")
    tiny_model().save_pretrained(tmp_path / "base")
    args = ["finetune", "--model", str(tmp_path / "base"), "--recipe", "shared", "--patch-sizes", "2,4",
            "--data", str(tmp_path / "d.npz"), "--steps", "6", "--batch-size", "16", "--lr", "1e-3",
            "--log-every", "1", "--ckpt-every", "6", "--threads", "1", "--no-progress"]
    one = subprocess.run(_cli(*args, "--out", str(tmp_path / "one")), env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(_free_port()), "-m", "flexikern"]
    two = subprocess.run(torchrun + args + ["--out", str(tmp_path / "two")], env=_env(),
                         capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(l1) == len(l2) == 6
    np.testing.assert_allclose(l2, l1, rtol=1e-4, atol=1e-6)
    a, b = _state(tmp_path / "one"), _state(tmp_path / "two")
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_changes_nothing_but_memory(tmp_path):
    data = tiny_data()
    for name, gc in (("plain", False), ("gc", True)):
        train(tiny_model(trained=True).flexify([2, 4], adapter="shared"), data,
              cfg(tmp_path, name, recipe="shared", steps=3, ckpt_every=3, gradient_checkpointing=gc))
    a, b = _state(tmp_path / "plain"), _state(tmp_path / "gc")
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-6, atol=1e-7)
