"""The package's layers run one way and its imports have no cycle.

apps (CLI, commands) -> diffusion, runtime, train, metrics -> models -> flexi -> ops -> kernels.
Read from the source (every import, function bodies and TYPE_CHECKING blocks included), so an
upward import fails here even where it would only run late.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import flexikern

PACKAGE = Path(flexikern.__file__).parent
KERNELS = Path(__import__("flexikern.kernels", fromlist=["_"]).__file__).parent

# Higher number = higher layer; a module may import its own layer or lower ones.
LAYERS = {
    "flexikern.kernels": 0, "flexikern._ext": 0, "flexikern.files": 0,
    "flexikern.ops": 1, "flexikern.images": 1, "flexikern.datasets": 1,
    "flexikern.flexi": 2,
    "flexikern.models": 3,
    "flexikern.diffusion": 4, "flexikern.runtime": 4, "flexikern.train": 4, "flexikern.metrics": 4,
    "flexikern.arguments": 5, "flexikern.train.commands": 5, "flexikern.evaluate": 5, "flexikern.cli": 5,
    "flexikern.info": 5, "flexikern.pipelines": 5, "flexikern.__main__": 6,
}


def _layer(module: str) -> int | None:
    """The layer of a module: its longest prefix in LAYERS (the root package has none)."""
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in LAYERS:
            return LAYERS[".".join(parts[:n])]
    return None


def _modules() -> dict[str, Path]:
    found = {}
    for root, prefix in ((PACKAGE, "flexikern"), (KERNELS, "flexikern.kernels")):
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if root == PACKAGE and parts[0] == "kernels":
                continue
            name = ".".join([prefix, *(parts[:-1] if parts[-1] == "__init__" else parts)])
            found[name] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the flexikern modules it imports (`from a import b` counts a.b when b is a module)."""
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                            for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_every_import_runs_down_the_layers():
    modules = _modules()
    assert all(_layer(m) is not None for m in modules if m != "flexikern"), \
        [m for m in modules if m != "flexikern" and _layer(m) is None]
    upward = [f"{m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
              for m, targets in _imports(modules).items() if m != "flexikern"
              for t in sorted(targets) if t != "flexikern" and _layer(t) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_the_package_has_no_import_cycle():
    graph = _imports(_modules())
    graph["flexikern"] = set()   # the root's lazy attributes (importlib by name) are not imports
    state: dict[str, int] = {}   # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                return path + [module, target]
            if target not in state:
                cycle = visit(target, path + [module])
                if cycle:
                    return cycle
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            assert cycle is None, " -> ".join(cycle)


def test_ops_and_kernels_load_no_upper_layer():
    """A leaf library another project could vendor: at run time too, the ops, their backends and
    the kernels load nothing above them."""
    code = ("import sys, torch, flexikern.ops as ops, flexikern.kernels._common, "
            "flexikern.kernels.patch_embed, flexikern.kernels.de_embed, flexikern.kernels.varlen_attention\n"
            "ops.patch_embed(torch.randn(1, 3, 4, 4), torch.randn(5, 3, 4, 4), None, 2)\n"
            "upper = [m for m in sys.modules if m.startswith('flexikern.') and not "
            "m.startswith(('flexikern.ops', 'flexikern.kernels', 'flexikern._ext', 'flexikern._C'))]\n"
            "assert not upper, upper\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
