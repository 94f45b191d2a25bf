"""Every loading error names the file and what is wrong, in plain text (no terminal escape codes)."""

import argparse
import fractions
import json

import pytest
import torch

import flexikern as fk
from reference_dit import DiT, randomize_

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def message(excinfo) -> str:
    text = str(excinfo.value)
    assert "\x1b" not in text, repr(text)
    return text


@pytest.fixture
def saved(tmp_path):
    """A folder written by save_pretrained: (folder, its config dict)."""
    model = fk.FlexiDiT.from_dit(randomize_(DiT(**TINY)).state_dict(), patch_sizes=(2, 4), lora_rank=4,
                                 num_heads=2)
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    return folder, json.loads((folder / "config.json").read_text())


def write_config(folder, config):
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))


@pytest.mark.parametrize("change,expected", [
    (lambda c: "", "config.json: the file is empty"),
    (lambda c: '{"input_size": 8,', "config.json: not valid JSON"),
    (lambda c: [1, 2], "config.json: expected a JSON object"),
    (lambda c: {k: v for k, v in c.items() if k != "patch_sizes"}, "config.json: no 'patch_sizes'"),
    (lambda c: {**c, "hidden_size": "32"}, 'config.json: hidden_size="32" is a string; expected an int'),
    (lambda c: {**c, "learn_sigma": 1}, "config.json: learn_sigma=1 is an int; expected true/false"),
    (lambda c: {**c, "depth": True}, "config.json: depth=true is true/false; expected an int"),
    (lambda c: {**c, "patch_sizes": 4}, "config.json: patch_sizes=4 is an int; expected a list"),
    (lambda c: {**c, "patch_sizes": [[2, 2], "x"]}, "config.json: .*patch_sizes"),
    (lambda c: {**c, "adapter": "full"}, "config.json: .*adapter='full'"),
    (lambda c: {**c, "format_version": 2}, "config.json: format_version 2 is unknown"),
    (lambda c: {**c, "format_version": 1.0}, "config.json: format_version 1.0 is unknown"),
    (lambda c: {**c, "format": "flexikern.FlexiPixArt"}, "config.json: format 'flexikern.FlexiPixArt'.*"
                                                          "FlexiPixArt.from_pretrained"),
    (lambda c: {**c, "colour": "red"}, r"config.json: unknown keys \['colour'\]"),
], ids=["empty", "invalid", "list", "no-patch-sizes", "str-int", "int-bool", "bool-int", "sizes-int",
        "bad-size", "bad-adapter", "version", "float-version", "format", "unknown-key"])
def test_bad_configs_name_the_file_and_the_problem(saved, change, expected):
    folder, config = saved
    write_config(folder, change(config))
    with pytest.raises(ValueError) as info:
        fk.FlexiDiT.from_pretrained(folder)
    assert str(folder / "config.json") in message(info)
    assert info.match(expected)


def test_truncated_weights_name_the_file(saved):
    folder, _ = saved
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300])
    with pytest.raises(ValueError, match="not a readable safetensors file: truncated or corrupt") as info:
        fk.FlexiDiT.from_pretrained(folder)
    assert str(weights) in message(info)


def test_from_pretrained_takes_only_device_and_dtype(saved):
    folder, _ = saved
    with pytest.raises(TypeError, match=r"unexpected patch_sizes=\[2, 8\]; it takes device= and dtype=") as info:
        fk.FlexiDiT.from_pretrained(folder, patch_sizes=[2, 8])
    assert str(folder) in message(info)
    model = fk.FlexiDiT.from_pretrained(folder, dtype=torch.float64)
    assert next(model.parameters()).dtype == torch.float64 and not model.training


def test_missing_folders_and_files(saved, tmp_path):
    folder, _ = saved
    with pytest.raises(FileNotFoundError, match="absent: no such folder"):
        fk.FlexiDiT.from_pretrained(tmp_path / "absent")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        fk.FlexiDiT.from_pretrained(folder)


def test_files_and_folders_point_to_each_others_loader(saved, tmp_path):
    folder, _ = saved
    path = tmp_path / "dit.pt"
    torch.save(randomize_(DiT(**TINY)).state_dict(), path)
    with pytest.raises(NotADirectoryError, match="dit.pt: a file.*FlexiDiT.from_dit"):
        fk.FlexiDiT.from_pretrained(path)
    with pytest.raises(IsADirectoryError, match="saved: a folder.*FlexiDiT.from_pretrained"):
        fk.FlexiDiT.from_dit(folder)


@pytest.mark.parametrize("kind", ["release", "training"])
def test_truncated_checkpoints_name_the_file(tmp_path, kind):
    state = randomize_(DiT(**TINY)).state_dict()
    payload = state if kind == "release" else {"model": state, "ema": state, "opt": {},
                                               "args": argparse.Namespace(num_classes=10)}
    path = tmp_path / "checkpoint.pt"
    torch.save(payload, path)
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint: truncated, corrupt") as info:
        fk.FlexiDiT.from_dit(path, num_heads=2)
    assert str(path) in message(info)


def test_refused_pickles_carry_no_escape_codes(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"ema": randomize_(DiT(**TINY)).state_dict(), "args": fractions.Fraction(1, 2)}, path)
    with pytest.raises(ValueError, match="refused to load.*fractions.Fraction") as info:
        fk.FlexiDiT.from_dit(path, num_heads=2)
    assert str(path) in message(info)


def test_state_dict_errors_say_what_was_given():
    with pytest.raises(ValueError, match="state dict: expected a state dict of tensors.*got a dict"):
        fk.FlexiDiT.from_dit({"blocks": {"weight": [1.0]}})
    with pytest.raises(TypeError, match="path_or_state_dict: expected a checkpoint path or a state dict, got int"):
        fk.FlexiDiT.from_dit(3)


# ----------------------------------------------------------------------------- diffusers folders

def test_diffusers_loader_errors(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    with pytest.raises(FileNotFoundError, match="absent: no such folder") as info:
        fk.FlexiDiT.from_diffusers(tmp_path / "absent")
    assert "huggingface" not in message(info)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty: neither a diffusers model"):
        fk.FlexiDiT.from_diffusers(tmp_path / "empty")
    folder = tmp_path / "dit"
    diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, num_layers=1, sample_size=8,
                                    num_embeds_ada_norm=10).save_pretrained(folder)
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match="diffusers could not load a DiTTransformer2DModel") as info:
        fk.FlexiDiT.from_diffusers(folder)
    assert str(folder) in message(info)
    (folder / "config.json").write_text("")
    with pytest.raises(ValueError, match="config.json: the file is empty") as info:
        fk.FlexiDiT.from_diffusers(folder)
    (tmp_path / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "DiTTransformer2DModel"]}))
    with pytest.raises(FileNotFoundError, match="no config.json.*diffusers folder: load it with from_diffusers"):
        fk.FlexiDiT.from_pretrained(tmp_path)          # a pipeline folder
    with pytest.raises(IsADirectoryError, match="a diffusers model or pipeline folder: load it with from_diffusers"):
        fk.FlexiDiT.from_dit(folder)


# ----------------------------------------------------------------------------- review: more loaders and arguments

def test_from_dit_checks_its_arguments_and_loads_fp16_checkpoints():
    state = randomize_(DiT(**TINY)).state_dict()
    for name, bad in (("num_classes", "10"), ("num_classes", True), ("num_heads", 0), ("input_size", 8.0)):
        with pytest.raises(ValueError, match=f"{name}={bad!r}: expected a positive int, or None"):
            fk.FlexiDiT.from_dit(state, **{"num_heads": 2, name: bad})
    with pytest.raises(ValueError, match=r"pos_embed has 16 positions, but input_size=16 .* needs 64"):
        fk.FlexiDiT.from_dit(state, num_heads=2, input_size=16)
    reference = fk.FlexiDiT.from_dit(state, num_heads=2)
    for dtype in (torch.float16, torch.bfloat16):   # pos_embed rounded to the checkpoint's dtype
        low = {k: v.to(dtype) for k, v in state.items()}
        model = fk.FlexiDiT.from_dit({f"module.{k}": v for k, v in low.items()}, num_heads=2)
        assert not model.training and next(model.parameters()).dtype == torch.float32   # as documented
        weights = reference.state_dict()
        assert all(torch.equal(v, weights[k].to(dtype).float()) for k, v in model.state_dict().items())


def test_save_pretrained_to_a_file_and_from_pretrained_device_and_dtype(saved, tmp_path):
    folder, _ = saved
    model = fk.FlexiDiT.from_pretrained(folder)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match="a_file: a file, not a folder; save_pretrained writes a folder"):
        model.save_pretrained(a_file)
    with pytest.raises(NotADirectoryError, match="a_file/sub: cannot make the folder"):
        model.save_pretrained(a_file / "sub")
    assert a_file.read_text() == "x"
    for kw, error, match in ((dict(dtype="float16"), TypeError, "dtype='float16': expected a floating torch.dtype"),
                             (dict(dtype=torch.int8), TypeError, "dtype=torch.int8"),
                             (dict(device="banana"), ValueError, "device='banana': not a device")):
        with pytest.raises(error, match=match) as info:
            fk.FlexiDiT.from_pretrained(folder, **kw)
        message(info)
    half = fk.FlexiDiT.from_pretrained(folder, dtype=torch.float16)
    half.save_pretrained(tmp_path / "half")
    back = fk.FlexiDiT.from_pretrained(tmp_path / "half", dtype=torch.float16)
    assert not back.training and all(torch.equal(a, b) for a, b in zip(half.state_dict().values(),
                                                                       back.state_dict().values()))


def test_classifier_load_names_a_missing_file_or_a_folder(tmp_path):
    from flexikern.metrics import ShapesClassifier
    with pytest.raises(FileNotFoundError, match="absent.safetensors: no such file; expected a classifier file"):
        ShapesClassifier.load(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match=": a folder; expected a classifier file"):
        ShapesClassifier.load(tmp_path)


def test_an_unreachable_hub_id_says_so(monkeypatch):
    """Without network (here: offline mode, so the test does not wait on retries) a Hub id fails
    saying it is neither cached nor reachable, not that the repository lacks config.json."""
    pytest.importorskip("diffusers")
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="neither in the local cache nor reachable.*hf download") as info:
        fk.FlexiDiT.from_diffusers("flexikern-tests/no-such-model")
    assert "config.json" not in message(info)
