"""The command line's boundary: every bad flag is one `error:` line (exit 2) before any work,
output paths are checked before sampling, shipped models by name, --compare, --threads, and the
one atomic writer every written file goes through."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import flexikern.cli as cli
from flexikern.arguments import shipped_models
from flexikern.cli import main
from flexikern.files import atomic_write
from flexikern.images import save_grid
from flexikern.models import FlexiDiT

from test_sampling import tiny

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster here


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A flexible tiny model, one without a null class, and a plain (single-size) one."""
    root = tmp_path_factory.mktemp("models")
    tiny().save_pretrained(root / "flexible")
    torch.manual_seed(1)
    FlexiDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2, num_classes=3,
             learn_sigma=False, class_dropout_prob=0.0).save_pretrained(root / "no_null")
    torch.manual_seed(2)
    FlexiDiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2, num_classes=3,
             learn_sigma=False).save_pretrained(root / "plain")
    (root / "a_file").write_text("x")
    return root


def fails(argv, capsys, *needles):
    """main(argv) exits 2 with one `error:` line holding every needle, and no traceback."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"flexikern {argv[0]}: error:") if argv else "error:" in last, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in last, err
    return last


@pytest.fixture
def no_work(monkeypatch):
    """Any model loading or sampling fails the test: the errors must come before them."""
    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the flags were checked")
    monkeypatch.setattr(cli, "load_model", forbidden)
    monkeypatch.setattr("flexikern.evaluate.load_shipped", forbidden)
    monkeypatch.setattr("flexikern.evaluate.evaluate_curves", forbidden)
    monkeypatch.setattr("flexikern.train.commands.load_data", forbidden)


# ------------------------------------------------------------------------------------ output paths
def test_output_paths_are_checked_before_any_work(dirs, tmp_path, capsys, no_work):
    a_file = dirs / "a_file"
    cases = {
        str(tmp_path): "is a directory",                         # a directory where a file goes
        str(a_file / "grid.png"): f"{a_file} is a file, not a folder",
        str(tmp_path / "grid.xyz"): "'.xyz'",
        str(tmp_path / "grid"): "no extension",
    }
    if Path("/sys").is_dir() and _cannot_create_in("/sys"):
        cases["/sys/flexikern-test/grid.png"] = "cannot write in /sys"
    for path, needle in cases.items():
        fails(["sample", "--model", "shapes16", "--out", path], capsys, "--out", needle)
        fails(["demo", "--out", path], capsys, "--out", needle)
    fails(["sample", "--model", "shapes16", "--npz", str(tmp_path / "s.png")], capsys, "--npz", ".npz")
    fails(["sample", "--model", "shapes16", "--npz", str(a_file / "s.npz")], capsys, "--npz", "not a folder")
    for command in (["eval"], ["train"], ["finetune", "--model", "shapes16"]):
        fails([*command, "--out", str(a_file)], capsys, "--out", "is a file; expected a folder")
        fails([*command, "--out", str(a_file / "run")], capsys, "--out", "not a folder")
    assert not list(tmp_path.iterdir())


def _cannot_create_in(folder: str) -> bool:
    try:
        with open(Path(folder) / ".flexikern-probe", "w"):
            pass
    except OSError:
        return True
    os.remove(Path(folder) / ".flexikern-probe")
    return False


def test_the_default_output_is_checked_too(tmp_path, capsys, monkeypatch, no_work):
    (tmp_path / "samples.png").mkdir()              # the default --out of `sample` is a folder here
    monkeypatch.chdir(tmp_path)
    fails(["sample", "--model", "shapes16"], capsys, "--out (default samples.png)", "is a directory")


# ------------------------------------------------------------------------------------ flags
BAD_FLAGS = [
    # (argv, needles): one per kind of flag, every subcommand
    (["sample", "--model", "shapes16", "--device", "banana"], ["--device", "'banana'", "cpu, cuda"]),
    (["sample", "--model", "shapes16", "--device", "cuda:99"], ["--device", "'cuda:99'"]),
    (["sample", "--model", "shapes16", "--steps", "0"], ["--steps", "positive integer"]),
    (["sample", "--model", "shapes16", "--num-samples", "-3"], ["--num-samples", "'-3'"]),
    (["sample", "--model", "shapes16", "--batch-size", "1.5"], ["--batch-size", "'1.5'"]),
    (["sample", "--model", "shapes16", "--threads", "-1"], ["--threads", "'-1'"]),
    (["sample", "--model", "shapes16", "--seed", "-1"], ["--seed", "2**63"]),
    (["sample", "--model", "shapes16", "--seed", "1.7"], ["--seed", "'1.7'"]),
    (["sample", "--model", "shapes16", "--guidance", "nan"], ["--guidance", "finite"]),
    (["sample", "--model", "shapes16", "--guidance", "inf"], ["--guidance", "finite"]),
    (["sample", "--model", "shapes16", "--eta", "-0.5"], ["--eta", ">= 0"]),
    (["sample", "--model", "shapes16", "--budget", "inf"], ["--budget", "fraction"]),
    (["sample", "--model", "shapes16", "--budget", "nan"], ["--budget", "fraction"]),
    (["sample", "--model", "shapes16", "--guidance-interval", "700,0"], ["--guidance-interval", "LO <= HI"]),
    (["sample", "--model", "shapes16", "--guidance-interval", "0,nan"], ["--guidance-interval", "LO,HI"]),
    (["sample", "--model", "shapes16", "--guidance-channels", "0"], ["--guidance-channels"]),
    (["sample", "--model", "shapes16", "--input-size", "-8"], ["--input-size"]),
    (["sample", "--model", "shapes16", "--patch-sizes", ","], ["--patch-sizes", "2,4"]),
    (["sample", "--model", "shapes16", "--sampler", "euler"], ["--sampler", "invalid choice"]),
    (["sample"], ["--model", "required"]),
    (["flops", "--model", "shapes16", "--steps", "-1"], ["--steps"]),
    (["train", "--out", "unused", "--lr", "-1"], ["--lr", "'-1'", "positive"]),
    (["train", "--out", "unused", "--lr", "nan"], ["--lr", "'nan'"]),
    (["train", "--out", "unused", "--weight-decay", "-0.1"], ["--weight-decay", ">= 0"]),
    (["train", "--out", "unused", "--warmup-steps", "-5"], ["--warmup-steps", ">= 0"]),
    (["train", "--out", "unused", "--grad-clip", "inf"], ["--grad-clip", "finite"]),
    (["train", "--out", "unused", "--ema-decay", "1"], ["--ema-decay", "[0, 1)"]),
    (["train", "--out", "unused", "--class-dropout", "1.5"], ["--class-dropout", "[0, 1)"]),
    (["train", "--out", "unused", "--seed", "x"], ["--seed"]),
    (["train", "--out", "unused", "--threads", "0"], ["--threads"]),
    (["train", "--out", "unused", "--device", "banana"], ["--device", "'banana'"]),
    (["train", "--out", "unused", "--steps", "0"], ["--steps"]),
    (["train", "--out", "unused", "--patch-size", "0"], ["--patch-size", "2x4"]),
    (["train", "--out", "unused", "--num-images", "-1"], ["--num-images"]),
    (["train"], ["--out", "required"]),
    (["finetune", "--out", "unused", "--model", "shapes16", "--patch-sizes", "2,x"], ["--patch-sizes", "'x'"]),
    (["finetune", "--out", "unused", "--model", "shapes16", "--lora-rank", "0"], ["--lora-rank"]),
    (["finetune", "--out", "unused", "--model", "shapes16", "--recipe", "magic"], ["--recipe"]),
    (["finetune", "--out", "unused"], ["--model", "required"]),
    (["eval", "--num-samples", "0"], ["--num-samples"]),
    (["eval", "--methods", "static,magic"], ["--methods", "magic", "calibrated"]),
    (["eval", "--guidance", "nan"], ["--guidance"]),
    (["eval", "--threads", "-1"], ["--threads"]),
    (["demo", "--budget", "-0.5"], ["--budget"]),
    (["demo", "--seed", "-3"], ["--seed"]),
    (["demo", "--guidance", "inf"], ["--guidance"]),
    (["demo", "--steps", "0"], ["--steps"]),
]


@pytest.mark.parametrize("argv,needles", BAD_FLAGS, ids=[" ".join(a[0:1] + a[-2:]) for a, _ in BAD_FLAGS])
def test_bad_flags_are_one_error_line(argv, needles, capsys, no_work):
    fails(argv, capsys, *needles)


def test_device_cuda_on_a_cpu_build_names_the_build(capsys, no_work):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    why = "CPU build" if torch.version.cuda is None else "0 visible GPU"
    fails(["sample", "--model", "shapes16", "--device", "cuda"], capsys, "--device", "'cuda'", why)


def test_bad_combinations_found_by_the_library_are_one_error_line(dirs, capsys, tmp_path):
    out = ["--out", str(tmp_path / "g.png"), "--steps", "2", "--no-progress"]
    fails(["sample", "--model", str(dirs / "no_null"), "--guidance", "2", *out], capsys,
          "no null class", "--guidance-mode none")
    fails(["sample", "--model", str(dirs / "flexible"), "--guidance-channels", "9", *out], capsys,
          "--guidance-channels 9", "4 channels")
    fails(["sample", "--model", str(dirs / "flexible"), "--sampler", "ddpm", "--eta", "0.5", *out], capsys,
          "eta=0.5", "ddim")
    fails(["sample", "--model", "DiT-S/2", "--input-size", "8", "--patch-sizes", "2,3", *out], capsys,
          "--patch-sizes / --adapter")
    fails(["sample", "--model", str(dirs / "flexible"), "--adapter", "shared", *out], capsys,
          "--adapter shared", "'lora'")                                          # silently ignored before
    fails(["flops", "--model", "shapes16", "--input-size", "8"], capsys, "--input-size 8", "(16)")
    fails(["sample", "--model", str(dirs / "flexible"), "--schedule", "static", "--compare", *out], capsys,
          "--compare", "drop --schedule")
    fails(["eval", "--model", str(dirs / "no_null"), "--guidance", "2", "--guidance-mode", "cfg"], capsys,
          "no null class")
    fails(["eval", "--model", str(tmp_path / "missing")], capsys, "--model", "missing", "shapes16")
    fails(["eval", "--classifier", str(dirs / "a_file")], capsys, "--classifier", "a_file")
    fails(["eval", "--num-samples", "1"], capsys, "--num-samples 1", "at least 2")
    assert not (tmp_path / "g.png").exists()


def test_train_and_finetune_errors_name_the_flag(dirs, tmp_path, capsys):
    run = ["--out", str(tmp_path / "run"), "--steps", "1", "--num-images", "8", "--batch-size", "4", "--no-progress"]
    fails(["train", "--patch-size", "3", "--image-size", "8", *run], capsys, "--patch-size 3x3", "8x8")
    fails(["train", "--hidden-size", "30", "--num-heads", "4", "--image-size", "8", *run], capsys,
          "--hidden-size 30", "--num-heads 4")
    fails(["finetune", "--model", str(dirs / "plain"), "--patch-sizes", "2,3", *run], capsys, "--patch-sizes 2x2,3x3")
    fails(["finetune", "--model", str(dirs / "flexible"), "--patch-sizes", "2,8", *run], capsys,
          "--patch-sizes 2x2,8x8", "already flexible")
    fails(["finetune", "--model", str(dirs / "flexible"), "--adapter", "shared", *run], capsys,
          "--adapter shared", "'lora'")
    fails(["finetune", "--model", str(tmp_path / "nothing"), *run], capsys, "--model", "nothing", "shapes16")
    fails(["finetune", "--model", str(dirs / "flexible"), "--data", str(dirs / "a_file"), *run], capsys, "--data")
    bad_npz = tmp_path / "bad.npz"
    bad_npz.write_bytes(b"not a zip")
    fails(["train", "--data", str(bad_npz), *run], capsys, "--data", "bad.npz")
    fails(["finetune", "--model", str(dirs / "flexible"), "--recipe", "distill", "--data", "shapes",
           "--image-size", "8", *run], capsys, "data: images are (3, 8, 8)", "(4, 8, 8)")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


# ------------------------------------------------------------------------------------ models by name
def test_shipped_models_by_name(capsys):
    assert {"shapes16", "t2i", "video"} <= set(shipped_models())
    assert main(["flops", "--model", "shapes16"]) == 0
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:3]]
    assert rows == ["2x2", "4x4"]
    err = fails(["flops", "--model", "shapes17"], capsys, "--model 'shapes17'", "shapes16, t2i, video", "DiT-S/2",
                "path")
    assert "Traceback" not in err
    fails(["sample", "--model", "t2i"], capsys, "FlexiPixArt")        # a text model: says which class loads it


def test_a_local_folder_wins_over_a_shipped_name(dirs, tmp_path, capsys, monkeypatch):
    FlexiDiT.from_pretrained(dirs / "plain").save_pretrained(tmp_path / "shapes16")
    monkeypatch.chdir(tmp_path)
    assert main(["flops", "--model", "shapes16"]) == 0        # the local single-size model, not the shipped one
    out = capsys.readouterr().out
    assert out.splitlines()[1].split()[0] == "2x2" and "4x4" not in out


# ------------------------------------------------------------------------------------ sample
def test_compare_without_a_schedule_uses_the_default_flexible_one(dirs, tmp_path, capsys):
    from flexikern.diffusion import Schedule
    png = tmp_path / "cmp.png"
    assert main(["sample", "--model", str(dirs / "flexible"), "--classes", "1", "--steps", "4", "--compare",
                 "--guidance", "1", "--guidance-mode", "none", "--out", str(png), "--no-progress"]) == 0
    out = capsys.readouterr().out
    model = FlexiDiT.from_pretrained(dirs / "flexible")
    expected = Schedule.for_budget(model, 4, cli.COMPARE_BUDGET, guidance=False)
    assert expected != Schedule.static(4, 2)
    assert f"comparing the static schedule with the flexible {expected.notation}" in out
    assert f"--budget {cli.COMPARE_BUDGET} (the default for --compare)" in out
    assert png.exists()


def test_sample_threads(dirs, tmp_path, capsys):
    torch.set_num_threads(1)
    assert main(["sample", "--model", str(dirs / "flexible"), "--classes", "1", "--steps", "1", "--threads", "2",
                 "--npz", str(tmp_path / "s.npz"), "--no-progress"]) == 0
    assert torch.get_num_threads() == 2
    torch.set_num_threads(1)
    assert np.load(tmp_path / "s.npz")["arr_0"].shape == (1, 8, 8, 3)
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]          # no temporary file left


# ------------------------------------------------------------------------------------ atomic writes
def test_atomic_write_full_disk_keeps_the_old_file_and_names_the_path(tmp_path, monkeypatch):
    from PIL import Image
    path = tmp_path / "grid.png"
    save_grid(np.full((1, 4, 4, 3), 7, np.uint8), path, 1)
    before = path.read_bytes()

    def full_disk(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half a png")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full_disk)
    with pytest.raises(OSError) as e:
        save_grid(np.full((1, 4, 4, 3), 9, np.uint8), path, 1)
    assert e.value.errno == errno.ENOSPC
    assert str(e.value).endswith(f"no space left on device while writing {path}; the previous grid.png is intact")
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["grid.png"]


def test_atomic_write_temporary_names_are_unique(tmp_path):
    with atomic_write(tmp_path / "a.npz") as one, atomic_write(tmp_path / "a.npz") as two:
        assert one != two and one.parent == two.parent == tmp_path and one.suffix == ".npz"
        one.write_text("1")
        two.write_text("2")
    assert (tmp_path / "a.npz").read_text() == "1" and os.listdir(tmp_path) == ["a.npz"]
    with pytest.raises(OSError, match=f"while writing {tmp_path / 'b.txt'}; no b.txt was written"):
        with atomic_write(tmp_path / "b.txt") as tmp:
            tmp.write_text("x")
            raise PermissionError(errno.EACCES, "Permission denied")
    assert os.listdir(tmp_path) == ["a.npz"]


# ------------------------------------------------------------------------------------ second review
IGNORED_OR_CLAMPED = [
    # flags that used to be silently ignored, clamped or dropped, each refused before any work
    (["sample", "--model", "shapes16", "--classes", "1,5-2"], ["--classes", "5-2 is empty", "2-5"]),
    (["sample", "--model", "shapes16", "--classes", "0-99999999999"], ["--classes", "more than 1000000"]),
    (["sample", "--model", "shapes16", "--guidance", "4", "--guidance-mode", "none"],
     ["--guidance 4.0 --guidance-mode none", "drop one"]),
    (["sample", "--model", "shapes16", "--guidance", "1", "--guidance-channels", "2"],
     ["--guidance-channels", "not guided"]),
    (["sample", "--model", "shapes16", "--guidance-mode", "none", "--guidance-interval", "0,500"],
     ["--guidance-interval", "not guided"]),
    (["sample", "--model", "shapes16", "--out", ""], ["--out", "empty path"]),
    (["flops", "--model", "shapes16", "--steps", "3"], ["--steps 3", "--budget"]),
    (["flops", "--model", "shapes16", "--most-powerful-steps"], ["--most-powerful-steps", "--budget F"]),
    (["eval", "--guidance-mode", "flexi"], ["--guidance-mode flexi", "scale is 1 (the default)", "--guidance S"]),
    (["eval", "--out", ""], ["--out", "empty path"]),
    (["demo", "--guidance", "3", "--guidance-mode", "none"], ["--guidance 3.0 --guidance-mode none"]),
    (["demo", "--num-samples", "1"], ["--num-samples 1", "at least 2"]),
    (["demo", "--seed", str(2 ** 63 - 1)], ["--seed", f"pass --seed {(2 ** 63 - 100) // 1_000_003} or less"]),
    (["train", "--out", ""], ["--out", "empty path"]),
    (["finetune", "--model", "shapes16", "--out", "unused", "--no-distill-sigma"],
     ["--no-distill-sigma", "--recipe distill"]),
]


@pytest.mark.parametrize("argv,needles", IGNORED_OR_CLAMPED,
                         ids=[" ".join(a[0:1] + a[-2:]) for a, _ in IGNORED_OR_CLAMPED])
def test_ignored_or_clamped_flags_are_one_error_line(argv, needles, capsys, no_work):
    fails(argv, capsys, *needles)


def test_flags_that_apply_to_other_modes_are_refused(dirs, tmp_path, capsys):
    base = ["--model", str(dirs / "flexible"), "--steps", "2", "--num-samples", "2", "--out", str(tmp_path / "g.png")]
    fails(["sample", *base, "--weak", "4"], capsys, "--weak 4x4", "static schedule has no weak steps")
    fails(["sample", *base, "--seed", str(2 ** 63 - 1)], capsys, "--seed", f"pass --seed {2 ** 63 - 2} or less")
    train_args = ["--out", str(tmp_path / "run"), "--steps", "1", "--no-progress"]
    fails(["train", *train_args, "--teacher-steps", "5"], capsys, "--teacher-steps", "--data teacher")
    np.savez(tmp_path / "d.npz", x=np.random.rand(4, 3, 8, 8).astype(np.float32), y=np.arange(4) % 3)
    fails(["train", *train_args, "--data", str(tmp_path / "d.npz"), "--num-images", "9"], capsys,
          "--num-images", "shapes or teacher")
    fails(["finetune", "--model", "shapes16", *train_args, "--lora-rank", "3"], capsys,
          "--lora-rank 3", "already flexible")
    fails(["finetune", "--model", str(dirs / "plain"), *train_args, "--lora-rank", "3"], capsys,
          "--lora-rank 3", "adapter is 'shared'")
    fails(["eval", "--model", str(dirs / "plain"), "--out", str(tmp_path / "e")], capsys, "one patch size")
    fails(["eval", "--model", str(dirs / "a_file"), "--out", str(tmp_path / "e")], capsys, "a file, not a folder")
    assert not (tmp_path / "run").exists() and not (tmp_path / "e").exists()


def test_guidance_scale_one_means_no_guidance(dirs, tmp_path, capsys):
    assert main(["sample", "--model", str(dirs / "flexible"), "--steps", "2", "--num-samples", "2", "--guidance", "1",
                 "--out", str(tmp_path / "g.png"), "--no-progress"]) == 0
    assert "guidance none 1.0" in capsys.readouterr().out


def test_info_subcommand(capsys):
    assert main(["info"]) == 0
    assert "varlen_attention" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["info", "--bogus"])


def test_a_full_disk_while_writing_is_one_error_line(dirs, tmp_path, capsys, monkeypatch):
    from PIL import Image

    def full_disk(self, fp, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", full_disk)
    path = tmp_path / "g.png"
    assert main(["sample", "--model", str(dirs / "flexible"), "--steps", "2", "--num-samples", "2",
                 "--out", str(path), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"flexikern sample: error: no space left on device while writing {path}; "
                                        "no g.png was written"]
    assert os.listdir(tmp_path) == []
