"""The command line: flexikern sample / flops, flag errors, and torchrun sharding to an ADM .npz."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from flexikern.arguments import patch_size_arg
from flexikern.cli import _build_schedule, build_parser, load_model, main
from flexikern.diffusion import Schedule
from flexikern.images import to_uint8

from test_sampling import tiny

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster here

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    tiny().save_pretrained(path)
    return str(path)


def run(argv, capsys):
    assert main(argv) == 0
    return capsys.readouterr().out


def fails(argv, capsys, *needles):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


def test_flops_table(model_dir, capsys):
    out = run(["flops", "--model", model_dir], capsys)
    rows = [line.split() for line in out.splitlines()[1:3]]
    assert [r[0] for r in rows] == ["2x2", "4x4"] and [r[1] for r in rows] == ["16", "4"]
    assert rows[0][3] == "1.000" and 0 < float(rows[1][3]) < 1   # rank-32 LoRA on a width-32 model
    out = run(["flops", "--model", "DiT-S/2", "--input-size", "8", "--budget", "0.6", "--steps", "10"], capsys)
    assert "budget 0.6: Schedule(" in out
    parser = build_parser()
    model = load_model(parser.parse_args(["flops", "--model", "DiT-S/2", "--input-size", "8"]), parser)
    assert repr(Schedule.for_budget(model, 10, 0.6)) in out                    # x/x, as sample --budget
    out = run(["flops", "--model", "DiT-S/2", "--input-size", "8", "--budget", "0.6", "--steps", "10",
               "--most-powerful-steps"], capsys)
    assert repr(Schedule.for_budget(model, 10, 0.6, equal_branches=False)) in out


def test_flops_from_a_dit_checkpoint(tmp_path, capsys):
    from reference_dit import DiT
    torch.manual_seed(0)
    dit = DiT(input_size=8, patch_size=2, hidden_size=384, depth=1, num_heads=6, num_classes=10)
    torch.save(dit.state_dict(), tmp_path / "dit.pt")
    out = run(["flops", "--model", str(tmp_path / "dit.pt"), "--patch-sizes", "2,4"], capsys)
    assert "2x2" in out and "4x4" in out


def test_sample_writes_a_grid(model_dir, tmp_path, capsys):
    png = tmp_path / "grid.png"
    out = run(["sample", "--model", model_dir, "--classes", "1,2,3", "--steps", "4", "--schedule", "weak_first:2",
               "--guidance", "2", "--out", str(png), "--no-progress"], capsys)
    assert "relative FLOPs 0." in out and "wall time" in out and "first 3 channels" in out
    img = Image.open(png)
    assert img.size == (2 + 2 * (128 + 2), 2 + 2 * (128 + 2))   # 3 samples in a 2x2 grid, 8 px enlarged 16x


def test_sample_compare_and_schedule_forms(model_dir, tmp_path, capsys):
    png = tmp_path / "cmp.png"
    out = run(["sample", "--model", model_dir, "--classes", "4", "--num-samples", "2", "--steps", "5",
               "--budget", "0.8", "--compare", "--out", str(png), "--no-progress", "--sampler", "ddim"], capsys)
    assert "speed-up" in out and "pairs of (static, flexible)" in out
    assert Image.open(png).size[0] == 2 + 2 * (128 + 2)
    out = run(["sample", "--model", model_dir, "--steps", "5", "--schedule", "3/2", "--classes", "0",
               "--out", str(png), "--no-progress", "--guidance-interval", "0,500", "--guidance-channels", "3"], capsys)
    assert "Schedule('3/2'" in out


def test_schedule_forms(model_dir):
    parser = build_parser()
    model = load_model(parser.parse_args(["flops", "--model", model_dir]), parser)
    expected = {"static": Schedule.static(5, 2), "3/2": Schedule.from_notation("3/2", 5, 4, 2),
                "weak_first:2": Schedule.weak_first(5, 2, 4, 2), "weak_first:1,3": Schedule.weak_first(5, 1, 4, 2, 3),
                "weak_last:2": Schedule.weak_last(5, 2, 4, 2)}
    for spec, schedule in expected.items():
        args = parser.parse_args(["sample", "--model", model_dir, "--steps", "5", "--schedule", spec])
        assert _build_schedule(args, model, True, parser) == schedule
    args = parser.parse_args(["sample", "--model", model_dir, "--steps", "5", "--budget", "0.9"])
    assert _build_schedule(args, model, False, parser) == Schedule.for_budget(model, 5, 0.9, guidance=False)
    assert _build_schedule(args, model, True, parser) == Schedule.for_budget(model, 5, 0.9, equal_branches=True)
    args = parser.parse_args(["sample", "--model", model_dir, "--steps", "5", "--budget", "0.9",
                              "--most-powerful-steps"])
    assert _build_schedule(args, model, True, parser) == Schedule.for_budget(model, 5, 0.9, equal_branches=False)


def test_bad_flags_say_how_to_fix_them(model_dir, capsys):
    base = ["sample", "--model", model_dir, "--steps", "5", "--classes", "1"]
    fails(base + ["--schedule", "fast"], capsys, "weak_first:N", "x/y")
    fails(base + ["--schedule", "9/1"], capsys, "[0, 5]", "--steps 5")
    fails(base[:-2] + ["--classes", "1,99"], capsys, "--classes", "0..9")
    fails(base[:-2] + ["--classes", "a"], capsys, "0-999")
    fails(base + ["--budget", "0.1"], capsys, "Raise the budget")
    fails(base + ["--budget", "0.5", "--schedule", "static"], capsys, "not allowed with")
    fails(base + ["--patch-sizes", "2,8"], capsys, "saved with patch sizes")
    fails(base + ["--weak", "8", "--schedule", "weak_first:2"], capsys, "(8, 8)", "supports only")
    fails(base + ["--most-powerful-steps"], capsys, "applies to --budget")
    fails(["sample", "--model", "DiT-Q/2"], capsys, "DiT-S/2")
    fails(["sample", "--model", model_dir, "--guidance-interval", "5"], capsys, "LO,HI")
    fails([], capsys, "COMMAND")


def test_patch_size_flags_use_the_one_parser(capsys):
    import argparse

    from flexikern.ops.patch_size import PatchSize
    assert patch_size_arg("4") == (4, 4) and patch_size_arg("2x4") == (2, 4)
    assert isinstance(patch_size_arg("4"), PatchSize)
    for bad in ("1x2x2", "0", "a", "2x"):
        with pytest.raises(argparse.ArgumentTypeError, match="2x4"):
            patch_size_arg(bad)
    fails(["sample", "--model", "DiT-S/2", "--weak", "4y"], capsys, "--weak", "'4y'", "2x4")


def test_to_uint8():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    img, note = to_uint8(x)
    assert note is None and img.shape == (1, 2, 2, 3) and img[0, :, :, 0].tolist() == [[0, 128], [255, 255]]
    lat, note = to_uint8(torch.randn(2, 4, 3, 3))
    assert "first 3 channels" in note and lat.min() == 0 and lat.max() == 255


def test_vae_decodes(model_dir, tmp_path, capsys):
    AutoencoderKL = pytest.importorskip("diffusers", reason="the test VAE is diffusers' AutoencoderKL").AutoencoderKL
    AutoencoderKL(down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                  block_out_channels=(8,), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  sample_size=8).save_pretrained(tmp_path / "vae")
    npz = tmp_path / "vae.npz"
    out = run(["sample", "--model", model_dir, "--steps", "2", "--classes", "1", "--vae", str(tmp_path / "vae"),
               "--npz", str(npz), "--no-progress"], capsys)
    assert "first 3 channels" not in out and np.load(npz)["arr_0"].shape == (1, 8, 8, 3)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_shards_give_the_single_process_samples(model_dir, tmp_path):
    # Same kernels in every process; CPU processes (gloo) even on a GPU machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT, "CUDA_VISIBLE_DEVICES": ""}
    args = ["-m", "flexikern", "sample", "--model", model_dir, "--classes", "0-4", "--num-samples", "5",
            "--batch-size", "2", "--steps", "3", "--schedule", "weak_first:1", "--no-progress"]
    one = tmp_path / "one.npz"
    subprocess.run([sys.executable, *args, "--npz", str(one)], check=True, env=env, cwd=tmp_path,
                   capture_output=True, timeout=300)
    two = tmp_path / "two.npz"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(_free_port()), *args, "--npz", str(two)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stdout
    a, b = np.load(one)["arr_0"], np.load(two)["arr_0"]
    assert a.shape == (5, 8, 8, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a[0], a[1])
    assert sorted(os.listdir(tmp_path)) == ["one.npz", "two.npz"]   # the shard files are gone
