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


def test_priority_lists_are_explicit_and_dispatch_imports_no_op():
    # Each op's backends, in the order written in its module's priority list (not import order),
    # and flexikern.ops._dispatch imports nothing of flexikern but the leaf `_cache` (no op
    # module: no cycle).
    import ast
    from pathlib import Path

    import flexikern.ops as ops
    from flexikern.ops import _dispatch
    assert {op: [b.name for b in entries] for op, entries in ops.backends().items()} == {
        "patchify": ["ext", "torch"], "unpatchify": ["ext", "torch"],
        "patch_embed": ["triton", "torch"], "de_embed": ["triton", "torch"],
        "varlen_attention": ["flash_attn", "torch_varlen", "xformers", "triton", "flex", "torch"]}
    tree = ast.parse(Path(_dispatch.__file__).read_text())
    modules = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not [m for m in modules if m.startswith("flexikern") and m != "flexikern.ops._cache"], modules


def test_info_refuses_unknown_arguments(capsys):
    import pytest
    from flexikern.info import main
    with pytest.raises(SystemExit) as e:
        main(["--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
