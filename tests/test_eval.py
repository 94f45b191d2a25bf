"""flexikern.metrics (Fréchet distance, classifier), Schedule.calibrate, and the `eval` / `demo`
commands of flexikern.evaluate."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from flexikern import metrics
from flexikern.datasets import CLASS_NAMES, DEFAULT_VERSION, make_shapes, shapes_split
from flexikern.diffusion import Schedule
from flexikern.diffusion.calibrate import gap_profile
from flexikern.metrics import ShapesClassifier, feature_stats, frechet_distance, load_shipped, train_classifier
from flexikern.models import FlexiDiT


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster here


def tiny_flexible(seed: int = 0) -> FlexiDiT:
    torch.manual_seed(seed)
    model = FlexiDiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=2, num_heads=2,
                     num_classes=3, learn_sigma=False)
    with torch.no_grad():    # DiT's init predicts exactly 0; perturb so that sizes differ
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.flexify([2, 4], adapter="shared").eval()


# ------------------------------------------------------------------------------------ FD
def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def test_fd_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    s = _random_spd(rng, 5)
    assert frechet_distance(mu1, s, mu1, s) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(mu1, s, mu1 + 2.0, s) == pytest.approx(4.0 * 5, rel=1e-8)


def test_fd_matches_the_eigenvalues_of_the_product_on_random_gaussians():
    rng = np.random.default_rng(1)
    for d in (1, 3, 16):
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        # Independent route: S1 S2 is similar to a PSD matrix, so its eigenvalues are real >= 0.
        tr_sqrt = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
        reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-7, abs=1e-9)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
    with pytest.raises(ValueError, match="shapes disagree"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_feature_stats_of_samples_converge():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(20000, 3)) * [1.0, 2.0, 0.5] + [1, 2, 3]
    mu, sigma = feature_stats(x)
    assert frechet_distance(mu, sigma, np.array([1, 2, 3]), np.diag([1.0, 4.0, 0.25])) < 0.01
    with pytest.raises(ValueError, match="N >= 2"):
        feature_stats(np.zeros((1, 3)))


# ------------------------------------------------------------------------------------ classifier
def test_score_is_fd_against_the_reference_and_accuracy_against_the_labels():
    torch.manual_seed(0)
    clf = ShapesClassifier(num_classes=3)
    x, labels = torch.rand(40, 3, 8, 8) * 2 - 1, torch.randint(0, 3, (40,))
    reference = feature_stats(np.random.default_rng(0).normal(size=(50, 64)))
    feats, pred = metrics.classify(clf, x)
    fd, accuracy = metrics.score(clf, x, labels, reference)
    assert fd == pytest.approx(frechet_distance(*feature_stats(feats), *reference), rel=1e-12)
    assert accuracy == pytest.approx((pred == labels.numpy()).mean()) and 0 < accuracy < 1


def test_classifier_learns_the_shapes_and_round_trips(tmp_path):
    pick = np.array([5, 6, 7])     # horizontal / vertical stripes, checkerboard: learnable in seconds
    x, y = make_shapes(1200, size=8, seed=0, labels=pick[np.arange(1200) % 3])
    clf = train_classifier(torch.from_numpy(x), torch.from_numpy(y), epochs=3, batch_size=32, lr=3e-3)
    xt, yt = make_shapes(150, size=8, seed=9, labels=pick[np.arange(150) % 3])
    with torch.no_grad():
        acc = (clf(torch.from_numpy(xt)).argmax(1).numpy() == yt).mean()
    assert acc > 0.55, acc       # chance is 1/3 (150 test images: 0.55 is far outside chance)
    clf.save(tmp_path / "c.safetensors")
    back = ShapesClassifier.load(tmp_path / "c.safetensors")
    with torch.no_grad():
        assert torch.equal(back.features(torch.from_numpy(xt)), clf.features(torch.from_numpy(xt)))


def test_shapes_dataset_is_deterministic_and_balanced():
    x1, y1 = make_shapes(50, size=16, seed=4)
    x2, y2 = make_shapes(50, size=16, seed=4)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2)
    assert x1.shape == (50, 3, 16, 16) and x1.dtype == np.float32 and -1 <= x1.min() and x1.max() <= 1
    assert np.bincount(y1).tolist() == [5] * len(CLASS_NAMES)
    assert not np.array_equal(make_shapes(50, size=16, seed=5)[0], x1)


def test_shapes_versions_and_their_classifiers():
    """Version 1 is the first release's data, bit for bit (the T2I/video examples were trained on
    it); version 2 (the default) draws larger objects with wider rings, arms and stripes."""
    import hashlib
    x1, _ = make_shapes(50, size=16, seed=4, version=1)
    assert hashlib.sha1(x1.tobytes()).hexdigest()[:16] == "f9782d955318a3a7"    # the pre-version code's output
    labels = np.zeros(400, dtype=np.int64)     # disks: the larger the disk, the more the pixels vary
    pixel_std = {v: float(make_shapes(400, seed=0, labels=labels, version=v)[0].std(axis=(1, 2, 3)).mean())
                 for v in (1, 2)}
    assert np.array_equal(make_shapes(50, size=16, seed=4, version=2)[0], make_shapes(50, size=16, seed=4)[0])
    assert pixel_std[2] > pixel_std[1]
    with pytest.raises(ValueError, match="version=3"):
        make_shapes(4, version=3)
    # Each shipped classifier recognises its own version's held-out images.
    from flexikern.metrics import ASSETS
    for version, name in ((2, "shapes_classifier.safetensors"), (1, "shapes_classifier_v1.safetensors")):
        x, y = make_shapes(500, size=16, seed=2, version=version)
        _, pred = metrics.classify(ShapesClassifier.load(ASSETS / name), torch.from_numpy(x))
        assert (pred == y).mean() > 0.93, (version, (pred == y).mean())


# ------------------------------------------------------------------------------------ calibrate
def test_calibrate_budget_picks_the_smallest_gaps():
    model = tiny_flexible()
    gaps = [0.1, 5.0, 0.2, 3.0, 0.05, 9.0]
    f2, f4 = model.flops(2), model.flops(4)
    budget = 1 - 2 * (f2 - f4) / (6 * f2)            # exactly two weak steps fit
    sched = Schedule.calibrate(model, 6, budget=budget + 1e-6, profile=gaps)
    assert [s[0] for s in sched.cond] == [4, 2, 2, 2, 4, 2]     # steps 4 and 0 (the smallest gaps)
    assert sched.guidance == sched.cond
    assert sched.relative_flops(model) <= budget + 1e-6
    tighter = Schedule.calibrate(model, 6, budget=budget - 1e-3, profile=gaps)   # one more weak step: step 2
    assert [s[0] for s in tighter.cond] == [4, 2, 4, 2, 4, 2]
    assert Schedule.calibrate(model, 6, budget=1.0, profile=gaps).cond == Schedule.static(6, 2).cond
    with pytest.raises(ValueError, match="raise the budget"):
        Schedule.calibrate(model, 6, budget=0.01, profile=gaps)


def test_calibrate_tolerance_and_arguments():
    model = tiny_flexible()
    gaps = [0.1, 5.0, 0.2, 3.0, 0.05, 10.0]
    sched = Schedule.calibrate(model, 6, tolerance=0.02, profile=gaps)
    assert [s[0] for s in sched.cond] == [4, 2, 4, 2, 4, 2]     # gaps <= 2% of the largest
    with pytest.raises(ValueError, match="exactly one"):
        Schedule.calibrate(model, 6, profile=gaps)
    with pytest.raises(ValueError, match="exactly one"):
        Schedule.calibrate(model, 6, budget=0.5, tolerance=0.1, profile=gaps)
    with pytest.raises(ValueError, match="one per step"):
        Schedule.calibrate(model, 5, budget=0.8, profile=gaps)


def test_gap_profile_on_a_real_model_and_schedule_calibrate():
    model = tiny_flexible()
    gaps = gap_profile(model, 5, num_samples=4, seed=3)
    assert len(gaps) == 5 and all(g >= 0 for g in gaps) and max(gaps) > 0
    assert gaps == gap_profile(model, 5, num_samples=4, seed=3)          # deterministic
    sched = Schedule.calibrate(model, 5, budget=0.7, num_samples=4, seed=3)
    assert sched.relative_flops(model) <= 0.7
    weak = [k for k, s in enumerate(sched.cond) if s == (4, 4)]
    order = sorted(range(5), key=lambda k: (gaps[k], k))
    assert weak == sorted(order[:len(weak)])
    plain = FlexiDiT(input_size=8, patch_size=2, in_channels=3, hidden_size=32, depth=1, num_heads=2,
                     num_classes=3)
    with pytest.raises(ValueError, match="flexify"):
        gap_profile(plain, 3)


# ------------------------------------------------------------------------------------ eval CLI
def test_eval_quick_writes_the_files(tmp_path):
    from flexikern.cli import main
    model = tiny_flexible()
    model.save_pretrained(tmp_path / "model")
    x, y = make_shapes(300, size=8, seed=0, num_classes=3)
    train_classifier(torch.from_numpy(x), torch.from_numpy(y), epochs=1, batch_size=64).save(tmp_path / "c.st")
    assert main(["eval", "--model", str(tmp_path / "model"), "--classifier", str(tmp_path / "c.st"), "--quick",
                 "--num-samples", "12", "--steps", "5", "--reference-samples", "40",
                 "--out", str(tmp_path / "out")]) == 0
    for name in ("eval.json", "eval.md", "eval.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    rows = result["rows"]
    assert result["meta"]["shapes_version"] == DEFAULT_VERSION
    methods = {r["method"] for r in rows}
    assert methods == {"real", "static", "flexi", "fewer_steps", "weak_last", "calibrated"}
    for r in rows:
        assert {"method", "relative_flops", "fd", "fd_std", "accuracy"} <= set(r)
        assert np.isfinite(r["fd"]) and 0 <= r["accuracy"] <= 1 and r["fd_std"] == 0   # one seed
    static = next(r for r in rows if r["method"] == "static")
    assert static["relative_flops"] == pytest.approx(1.0)
    for r in rows:
        if r["method"] not in ("static", "real"):
            assert r["relative_flops"] <= r["level"] + 0.07, r   # at or near the nominal level
    assert "| flexi |" in (tmp_path / "out" / "eval.md").read_text()
    # The row for exactly what `--budget 0.6` (Schedule.for_budget's default) picks.
    default = next(r for r in rows if r["method"] == "flexi" and r["level"] == 0.6)
    assert default["schedule"] == repr(Schedule.for_budget(model, 5, 0.6, guidance=False))
    # The real-vs-real floor: real images of the test split, scored like the samples.
    real = next(r for r in rows if r["method"] == "real")
    x_test, y_test = shapes_split("test", 12, size=8)
    x_ref, _ = shapes_split("heldout", 40, size=8)
    clf = ShapesClassifier.load(tmp_path / "c.st")
    feats, pred = metrics.classify(clf, torch.from_numpy(x_test))
    expected = frechet_distance(*feature_stats(feats), *feature_stats(metrics.classify(clf, torch.from_numpy(x_ref))[0]))
    assert real["fd"] == pytest.approx(expected) and real["accuracy"] == pytest.approx((pred == y_test).mean())


def test_eval_with_a_diffusers_scheduler_and_levels(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from flexikern.cli import main
    model = tiny_flexible()
    model.save_pretrained(tmp_path / "model")
    x, y = make_shapes(200, size=8, seed=0, num_classes=3)
    train_classifier(torch.from_numpy(x), torch.from_numpy(y), epochs=1, batch_size=64).save(tmp_path / "c.st")
    common = ["eval", "--model", str(tmp_path / "model"), "--classifier", str(tmp_path / "c.st"), "--quick",
              "--num-samples", "8", "--steps", "5", "--reference-samples", "20", "--out", str(tmp_path / "out")]
    assert main([*common, "--sampler", "DPMSolverMultistepScheduler", "--levels", "0.8"]) == 0
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert result["meta"]["sampler"] == "DPMSolverMultistepScheduler"
    rows = {(r["method"], r["level"]) for r in result["rows"]}   # calibrated is left out with a scheduler
    assert rows == {("real", None), ("static", 1.0), ("flexi", 0.8), ("fewer_steps", 0.8), ("weak_last", 0.8)}
    for argv, message in ((["--sampler", "DPMSolverMultistepScheduler", "--methods", "static,calibrated"],
                           "calibrate measures its gaps with flexikern's ddim or ddpm"),
                          (["--sampler", "Nope"], "expected ddim, ddpm or a diffusers scheduler class"),
                          (["--levels", "0.6,60"], "expected comma-separated fractions below 1")):
        with pytest.raises(SystemExit):
            main([*common, *argv])
        assert message in capsys.readouterr().err


def test_demo_runs_on_the_shipped_model(tmp_path, capsys):
    from flexikern.cli import main
    model, _ = load_shipped()
    assert model.patch_sizes == ((2, 2), (4, 4)) and model.input_size == 16
    out = tmp_path / "demo.png"
    assert main(["demo", "--out", str(out), "--num-samples", "10", "--steps", "4"]) == 0
    text = capsys.readouterr().out
    assert out.stat().st_size > 0 and "relative FLOPs" in text and "FD" in text and "speed-up" in text


def test_demo_figure_names_every_class_and_prints_flops_time_and_fd():
    from flexikern.diffusion import Guidance
    from flexikern.evaluate import _demo_figure
    from flexikern.metrics import pyplot
    plt = pyplot()
    model, _ = load_shipped()
    x = torch.rand(20, 3, 16, 16) * 2 - 1
    fig = _demo_figure(plt, model, {"static": ("p=2x2", 1.0), "FlexiDiT": ('"9/9"', 0.585)},
                       {"static": (x, 9.61, 123.4, 0.91), "FlexiDiT": (x, 4.92, 130.2, 0.9)}, Guidance(5.0), 20)
    titles = [ax.get_title().replace("\n", " ") for ax in fig.axes if ax.get_title()]
    assert titles == ["disk", "square", "triangle", "ring", "plus", "horizontal stripes", "vertical stripes",
                      "checkerboard", "diagonal stripes", "cross"]          # one column per class, not cut
    labels = [ax.get_ylabel() for ax in fig.axes if ax.get_ylabel()]
    assert len(labels) == 2 and len(fig.axes) == 4 * 10                   # 2 samples per class and schedule
    assert all(word in labels[0] for word in ("static", "FLOPs 1.00", "9.6 s", "FD 123", "acc 0.91"))
    assert all(word in labels[1] for word in ('FlexiDiT "9/9"', "FLOPs 0.58", "4.9 s", "FD 130", "acc 0.90"))
    plt.close(fig)


@pytest.mark.parametrize("command", ["eval", "demo"])
def test_figures_without_matplotlib_say_which_extra(command, monkeypatch, capsys):
    from flexikern.cli import main
    monkeypatch.setitem(sys.modules, "matplotlib", None)      # import matplotlib raises ImportError
    with pytest.raises(SystemExit) as e:
        main([command, "--out", "unused.png" if command == "demo" else "unused"])
    assert e.value.code == 2
    assert 'pip install "flexikern[eval]"' in capsys.readouterr().err
