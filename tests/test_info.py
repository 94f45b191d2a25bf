import subprocess
import sys


def test_info_lists_every_op_and_backend():
    out = subprocess.run([sys.executable, "-m", "flexikern.info"], check=True, capture_output=True,
                         text=True).stdout
    for op in ("patchify", "unpatchify", "patch_embed", "de_embed", "varlen_attention"):
        assert f"\n  {op}" in out
    assert "<- chosen" in out and "torch" in out and "extension flexikern._C" in out


def test_forced_backend_errors_name_the_choices(monkeypatch):
    import pytest
    import torch
    import flexikern as fk
    monkeypatch.setenv("FLEXIKERN_BACKEND", "patchify:nope")
    with pytest.raises(ValueError, match="known backends"):
        fk.ops.patchify(torch.randn(1, 2, 4, 4), 2)
    monkeypatch.setenv("FLEXIKERN_BACKEND", "patchify")
    with pytest.raises(ValueError, match="op:backend"):
        fk.ops.patchify(torch.randn(1, 2, 4, 4), 2)
    monkeypatch.delenv("FLEXIKERN_BACKEND")
    with pytest.raises(ValueError, match="unknown op"):
        with fk.ops.use_backend(nope="torch"):
            pass
    with fk.ops.use_backend(patchify="torch"):
        assert fk.ops.select("patchify", x=torch.randn(1, 2, 4, 4), patch_size=(2, 2)).name == "torch"
