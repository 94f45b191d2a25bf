"""Training runs that must not go wrong silently: resume with other settings, a torn log, finetune
seeding, two runs on one directory, a full disk during a checkpoint, a truncated checkpoint."""

from __future__ import annotations

import errno
import json
import os
import socket

import pytest
import torch

from flexikern.cli import main
from flexikern.datasets import make_shapes
from flexikern.models import FlexiDiT
from flexikern.train import TensorData, TrainConfig, TrainSetupError, load_checkpoint, save_checkpoint, train
from flexikern.train.trainer import _run_lock

TINY = dict(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=3,
            learn_sigma=False)


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster here


def model(**overrides) -> FlexiDiT:
    torch.manual_seed(0)
    return FlexiDiT(**{**TINY, **overrides})


def data(seed: int = 3) -> TensorData:
    return TensorData(*make_shapes(24, size=8, seed=seed, num_classes=3))


def config(out, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(out_dir=str(out), steps=4, batch_size=8, lr=1e-3, log_every=1, ckpt_every=2,
                                 progress=False), **kw})


# ------------------------------------------------------------------------------------ resume settings
def test_resume_with_other_settings_is_refused_naming_them(tmp_path):
    out = tmp_path / "run"
    train(model(), data(), config(out, max_steps=2))
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2
    for kw, m, d, needles in [
            (dict(lr=2e-3), model(), data(), ["lr 0.001 -> 0.002"]),
            (dict(seed=5, steps=6), model(), data(), ["seed 0 -> 5", "steps 4 -> 6"]),
            (dict(batch_size=4), model(), data(), ["batch_size 8 -> 4"]),
            (dict(recipe="shared"), model().flexify([2, 4], adapter="shared"), data(),
             ["recipe 'pretrain' -> 'shared'", "model.patch_sizes [[2, 2]] -> [[2, 2], [4, 4]]"]),
            ({}, model(hidden_size=64), data(), ["model.hidden_size 32 -> 64"]),
            ({}, model(), data(seed=4), ["data.checksum"])]:
        with pytest.raises(TrainSetupError) as e:
            train(m, d, config(out, **kw))
        for needle in needles:
            assert needle in str(e.value), str(e.value)
        assert str(out / "checkpoint.pt") in str(e.value) and "allow_changes=True" in str(e.value)
        assert load_checkpoint(out / "checkpoint.pt")["step"] == 2           # nothing ran
    # settings that change neither weights nor data order are free; allow_changes continues
    train(model(), data(), config(out, max_steps=3, log_every=3, ckpt_every=1, progress=False))
    with pytest.warns(UserWarning, match="lr 0.001 -> 0.002"):
        train(model(), data(), config(out, lr=2e-3), allow_changes=True)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["step"] == 4 and ckpt["settings"]["lr"] == 2e-3


def test_cli_resume_refuses_other_flags_unless_allow_changes(tmp_path, capsys):
    torch.manual_seed(0)
    TensorData(*make_shapes(16, size=8, seed=0, num_classes=3)).save_npz(tmp_path / "d.npz")
    args = ["train", "--data", str(tmp_path / "d.npz"), "--hidden-size", "32", "--depth", "1", "--num-heads", "2",
            "--steps", "2", "--batch-size", "4", "--ckpt-every", "1", "--threads", "1", "--no-progress",
            "--out", str(tmp_path / "run")]
    assert main(args) == 0
    with pytest.raises(SystemExit) as e:
        main(args[:-2] + ["--lr", "1e-3", "--out", str(tmp_path / "run")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("flexikern train: error:") and "lr 0.0003 -> 0.001" in err and "--allow-changes" in err
    with pytest.warns(UserWarning, match="lr 0.0003 -> 0.001"):
        assert main(args[:-2] + ["--lr", "1e-3", "--allow-changes", "--out", str(tmp_path / "run")]) == 0


# ------------------------------------------------------------------------------------ the log
def test_a_torn_last_log_line_is_dropped_a_corrupt_one_named(tmp_path):
    out = tmp_path / "run"
    train(model(), data(), config(out, max_steps=3))           # checkpoint at 2, log rows 1..3
    log = out / "log.jsonl"
    rows = log.read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2, 3]
    log.write_text("\n".join(rows) + "\n" + rows[0][:17])       # a kill mid-write: a torn last line
    with pytest.warns(UserWarning, match="line 4: dropped a torn last line"):
        train(model(), data(), config(out))
    assert [json.loads(r)["step"] for r in log.read_text().splitlines()] == [1, 2, 3, 4]

    full = tmp_path / "full"
    train(model(), data(), config(full))
    assert log.read_text().count("\n") == (full / "log.jsonl").read_text().count("\n")
    rows = log.read_text().splitlines()
    log.write_text("\n".join([rows[0], '{"step": 2, "loss": 0.', *rows[2:]]) + "\n")
    with pytest.raises(TrainSetupError, match=f"{log}, line 2: not a log row"):
        train(model(), data(), config(out, steps=4), resume=True)


# ------------------------------------------------------------------------------------ finetune seed
def test_finetune_is_a_function_of_its_seed(tmp_path):
    model(num_classes=10).save_pretrained(tmp_path / "plain")        # the shapes data has 10 classes

    def finetune(name, seed, data_source="shapes"):
        source_flags = ["--teacher-steps", "2"] if data_source == "teacher" else ["--image-size", "8"]
        assert main(["finetune", "--model", str(tmp_path / "plain"), "--recipe", "distill", "--patch-sizes", "2,4",
                     "--lora-rank", "4", "--data", data_source, "--num-images", "8", *source_flags,
                     "--steps", "2", "--batch-size", "4", "--seed", str(seed),
                     "--threads", "1", "--no-progress", "--out", str(tmp_path / name)]) == 0
        return load_checkpoint(tmp_path / name / "checkpoint.pt")

    for source in ("shapes", "teacher"):
        a, b, c = finetune(f"a{source}", 1, source), finetune(f"b{source}", 1, source), finetune(f"c{source}", 2, source)
        for part in ("model", "ema"):
            assert a[part].keys() == b[part].keys()
            for k in a[part]:
                assert torch.equal(a[part][k], b[part][k]), (source, part, k)
        assert any(not torch.equal(a["model"][k], c["model"][k]) for k in a["model"] if "lora" in k)
    teacher = lambda name: TensorData.from_npz(tmp_path / name / "teacher_samples.npz").x   # noqa: E731
    assert torch.equal(teacher("ateacher"), teacher("bteacher"))
    assert not torch.equal(teacher("ateacher"), teacher("cteacher"))


def test_teacher_cache_is_keyed_by_what_made_it(tmp_path):
    from flexikern.train import teacher_samples
    torch.manual_seed(0)
    teacher = model()
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    cache = tmp_path / "t.npz"
    one = teacher_samples(teacher, 6, steps=2, cache=cache, seed=1)
    assert torch.equal(teacher_samples(teacher, 6, steps=2, cache=cache, seed=1).x, one.x)
    other_seed = teacher_samples(teacher, 6, steps=2, cache=cache, seed=2)
    assert not torch.equal(other_seed.x, one.x)                              # not the stale seed-1 samples
    assert torch.equal(other_seed.x, teacher_samples(teacher, 6, steps=2, seed=2).x)
    with torch.no_grad():
        next(teacher.parameters()).mul_(2)
    assert not torch.equal(teacher_samples(teacher, 6, steps=2, cache=cache, seed=2).x, other_seed.x)


# ------------------------------------------------------------------------------------ one run per directory
def test_a_second_run_on_one_directory_is_refused_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with _run_lock(out):
        with pytest.raises(TrainSetupError) as e:
            train(model(), data(), config(out))
        with pytest.raises(TrainSetupError, match=f"pid {os.getpid()} on host"):       # a third: still named
            train(model(), data(), config(out))
    message = str(e.value)
    assert f"pid {os.getpid()} on host {socket.gethostname()}, started" in message and str(out / ".lock") in message
    assert not (out / "checkpoint.pt").exists()
    train(model(), data(), config(out))                                       # released: the run goes ahead
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lock"]   # no temporary files


# ------------------------------------------------------------------------------------ full disk
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)          # most of it written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as e:
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    assert e.value.errno == errno.ENOSPC
    assert f"no space left on device while writing {path}; the previous checkpoint.pt is intact" in str(e.value)
    assert os.listdir(tmp_path) == ["checkpoint.pt"] and load_checkpoint(path)["step"] == 1

    out = tmp_path / "run"                          # in a run: the error reaches the caller, the lock is freed
    with pytest.raises(OSError, match="no space left on device while writing .*checkpoint.pt; no checkpoint.pt"):
        train(model(), data(), config(out))
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == [".lock", "log.jsonl", "train_config.json"]
    train(model(), data(), config(out))
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4


def test_a_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "w": torch.randn(100)})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"{path}: not a readable PyTorch checkpoint: truncated.*delete it to "
                                         "start the run afresh"):
        load_checkpoint(path)


def test_config_rejects_non_finite_and_out_of_range_values(tmp_path):
    for kw, needle in [(dict(lr=float("nan")), "lr=nan"), (dict(lr=-1.0), "lr=-1.0"), (dict(lr=0.0), "lr=0.0"),
                       (dict(weight_decay=float("inf")), "weight_decay=inf"),
                       (dict(grad_clip=float("nan")), "grad_clip=nan"), (dict(warmup_steps=-1), "warmup_steps=-1"),
                       (dict(seed=-1), "seed=-1"), (dict(seed=1.5), "seed=1.5"), (dict(seed=2 ** 64), "seed="),
                       (dict(steps=True), "steps=True"), (dict(max_steps=0), "max_steps=0")]:
        with pytest.raises(ValueError, match=needle.replace("*", r"\*")):
            config(tmp_path, **kw)


# ------------------------------------------------------------------------------------ second review
def test_a_resume_that_cannot_load_is_a_setup_error(tmp_path):
    out = tmp_path / "run"
    train(model(), data(), config(out, steps=2))
    with pytest.warns(UserWarning, match="model.depth 1 -> 2"), \
            pytest.raises(TrainSetupError, match="its weights do not fit this model .*Missing key"):
        train(model(depth=2), data(), config(out, steps=2), allow_changes=True)   # allowed, but cannot load

    other = tmp_path / "other"
    other.mkdir()
    torch.save({"model": {"w": torch.randn(2)}}, other / "checkpoint.pt")         # e.g. a DiT state dict
    with pytest.raises(TrainSetupError, match=r"not a training checkpoint of flexikern.train \(no \['ema', 'opt'"):
        train(model(), data(), config(other))
    (other / "checkpoint.pt").unlink()
    (other / "checkpoint.pt").mkdir()
    with pytest.raises(TrainSetupError, match="a folder, not a checkpoint file"):
        train(model(), data(), config(other))


def test_a_log_row_without_an_int_step_is_named(tmp_path):
    out = tmp_path / "run"
    train(model(), data(), config(out, max_steps=3))
    log = out / "log.jsonl"
    rows = log.read_text().splitlines()
    log.write_text("\n".join([rows[0], '{"step": "2", "loss": 0.5}', *rows[2:]]) + "\n")
    with pytest.raises(TrainSetupError, match=f"{log}, line 2: not a log row \\(TypeError: step '2' is not an int"):
        train(model(), data(), config(out), resume=True)


def test_an_interrupted_checkpoint_leaves_no_temporary_file(tmp_path, monkeypatch):
    real_save = torch.save

    def interrupted(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", interrupted)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train(model(), data(), config(out))
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == [".lock", "log.jsonl", "train_config.json"]
    train(model(), data(), config(out))                                   # the lock went with the run
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path):
    import signal
    import subprocess
    import sys
    import time
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from flexikern.train.trainer import _run_lock\n"
                               f"with _run_lock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TrainSetupError, match=f"pid {holder.pid} on host"):
            train(model(), data(), config(out))
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    train(model(), data(), config(out))                                   # kill -9 released the flock
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 4
