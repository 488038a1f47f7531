"""The house rules, read from the code's own imports (ast), not from names or line counts:

- no import circle between fastprerl modules (imports inside functions count: deferring an import hides a
  circle, it does not break it);
- the walls: `kernels/` imports nothing of fastprerl but its own modules; the reward code (fastprerl/rewards/)
  imports no torch and no model code (it runs in the verification worker processes); `objectives` imports no
  model code (it works on tensors); only the drivers (cli, study) import the trainer;
- no private name (`_name`) is imported, or reached through an imported module, across modules.

Every check is a function of a source tree, so that the tests at the end can plant a violation of each rule in
a copy of the tree and see the check name it.
"""
from __future__ import annotations

import ast
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

MODEL_LIBRARIES = {"torch", "transformers", "peft", "vllm", "triton", "safetensors", "accelerate"}
MODEL_CODE = {"fastprerl.models", "fastprerl.lora", "fastprerl.rollout", "fastprerl.trainer", "fastprerl.passes",
              "fastprerl.packing", "fastprerl.attention", "fastprerl.distributed", "fastprerl.state",
              "fastprerl.evaluation"}
DRIVERS = {"fastprerl.cli", "fastprerl.__main__", "fastprerl.study"}


@dataclass(frozen=True)
class Import:
    source: str      # the importing module, e.g. "fastprerl.state.dcp"
    target: str      # the imported module: "fastprerl.state.checkpoint", "torch", ...
    names: tuple[str, ...]   # the names taken from it (() for `import x`)
    line: int


def _modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for fastprerl/ and the kernel modules in kernels/ (installed as fastprerl.kernels)."""
    found = {}
    for p in sorted((root / "fastprerl").rglob("*.py")):
        parts = list(p.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = p
    for p in sorted((root / "kernels").glob("*.py")):
        found[f"fastprerl.kernels.{p.stem}"] = p
    return found


def _package_of(module: str, path: Path) -> list[str]:
    parts = module.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def imports(root: Path) -> list[Import]:
    """Every import statement of every module (top level and inside functions), targets resolved to modules:
    `from .state import resume` imports the module fastprerl.state.resume, `from .state import ResumeError`
    the package fastprerl.state."""
    modules = _modules(root)
    out = []
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                out += [Import(mod, a.name, (), node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = _package_of(mod, path)[:len(_package_of(mod, path)) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in modules:
                        out.append(Import(mod, sub, (), node.lineno))
                    else:
                        out.append(Import(mod, target, (a.name,), node.lineno))
    return out


def _ours(target: str) -> bool:
    return target == "fastprerl" or target.startswith("fastprerl.")


def _within(target: str, prefixes) -> bool:
    return any(target == p or target.startswith(p + ".") for p in prefixes)


def circles(root: Path) -> list[list[str]]:
    """Every import circle between fastprerl modules, each once, as [a, b, ..., a]."""
    graph: dict[str, set[str]] = {}
    for imp in imports(root):
        if _ours(imp.target) and imp.target != imp.source:
            graph.setdefault(imp.source, set()).add(imp.target)
    found, seen = [], set()

    def walk(node: str, path: list[str], on_path: set[str]):
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_path:
                cycle = path[path.index(nxt):] + [nxt]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    found.append(cycle)
            elif nxt not in done:
                walk(nxt, path + [nxt], on_path | {nxt})
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            walk(start, [start], {start})
    return found


def wall_breaches(root: Path) -> list[str]:
    """Imports across the walls, as 'source:line imports target'."""
    bad = []
    for imp in imports(root):
        src, tgt, top = imp.source, imp.target, imp.target.split(".")[0]
        where = f"{src}:{imp.line} imports {tgt}"
        if _within(src, ["fastprerl.kernels"]) and _ours(tgt) and not _within(tgt, ["fastprerl.kernels"]):
            bad.append(f"kernels wall: {where}")
        if _within(src, ["fastprerl.rewards"]) and (top in MODEL_LIBRARIES or (_ours(tgt) and tgt != "fastprerl"
                                                                                 and not _within(tgt, ["fastprerl.rewards"]))):
            bad.append(f"rewards wall: {where}")
        if src == "fastprerl.objectives" and (top in MODEL_LIBRARIES - {"torch"} or _within(tgt, MODEL_CODE)):
            bad.append(f"objectives wall: {where}")
        if _within(tgt, ["fastprerl.trainer"]) and src != "fastprerl.trainer" and not _within(src, DRIVERS):
            bad.append(f"trainer wall: {where}")
    return bad


def private_reaches(root: Path) -> list[str]:
    """`from fastprerl.x import _name`, and `mod._name` where `mod` is an imported fastprerl module."""
    modules = _modules(root)
    bad = []
    for imp in imports(root):
        if _ours(imp.target) and imp.target != imp.source:
            bad += [f"{imp.source}:{imp.line} imports {imp.target}.{n}" for n in imp.names
                    if n.startswith("_") and not n.startswith("__")]
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}
        for node in ast.walk(tree):   # names bound to fastprerl modules: `from . import x as y`, `import a.b as c`
            if isinstance(node, ast.ImportFrom):
                for imp in imports_of(node, mod, path, modules):
                    aliases[imp[0]] = imp[1]
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if _ours(a.name) and a.asname:
                        aliases[a.asname] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{mod}:{node.lineno} reaches {aliases[node.value.id]}.{node.attr}")
    return bad


def imports_of(node: ast.ImportFrom, mod: str, path: Path, modules) -> list[tuple[str, str]]:
    """(bound name, module) for the names of a `from ... import` that are fastprerl modules."""
    if node.level:
        base = _package_of(mod, path)[:len(_package_of(mod, path)) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [(a.asname or a.name, f"{target}.{a.name}") for a in node.names if f"{target}.{a.name}" in modules]


# ---------------------------------------------------------------------------------------------- the rules
def test_the_walk_finds_the_package():
    found = _modules(ROOT)
    assert {"fastprerl.trainer", "fastprerl.rewards.worker", "fastprerl.state.checkpoint",
            "fastprerl.kernels.api", "fastprerl.evaluation", "fastprerl.study.runner"} <= set(found)
    assert len(imports(ROOT)) > 200


def test_no_import_circle():
    assert circles(ROOT) == []


def test_the_walls_hold():
    assert wall_breaches(ROOT) == []


def test_no_private_name_crosses_a_module():
    assert private_reaches(ROOT) == []


def test_every_package_says_its_job_and_exports_its_names():
    for init in sorted((ROOT / "fastprerl").glob("*/__init__.py")):
        tree = ast.parse(init.read_text())
        assert ast.get_docstring(tree), f"{init.relative_to(ROOT)}: no package docstring"
        exported = [n for n in tree.body if isinstance(n, ast.Assign)
                    and any(getattr(t, "id", "") == "__all__" for t in n.targets)]
        assert exported, f"{init.relative_to(ROOT)}: no __all__"


# ----------------------------------------------------------------- each check fails on a planted violation
@pytest.fixture()
def tree(tmp_path) -> Path:
    """A copy of fastprerl/ and kernels/ to plant violations in."""
    for name in ("fastprerl", "kernels"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    assert circles(tmp_path) == [] and wall_breaches(tmp_path) == [] and private_reaches(tmp_path) == []
    return tmp_path


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + "\n" + text + "\n")


def test_a_circle_is_found_also_when_deferred_into_a_function(tree):
    _append(tree / "fastprerl" / "lora.py", "def _later():\n    from .state.checkpoint import save_model\n")
    found = circles(tree)
    assert any({"fastprerl.lora", "fastprerl.state.checkpoint"} <= set(c) for c in found), found


@pytest.mark.parametrize("where, text, wall", [
    ("kernels/reference.py", "from fastprerl.models import lm_head_weight", "kernels wall"),
    ("kernels/api.py", "def _f():\n    from .. import objectives", "kernels wall"),
    ("fastprerl/rewards/tasks.py", "import torch", "rewards wall"),
    ("fastprerl/rewards/registry.py", "from ..models import load_tokenizer", "rewards wall"),
    ("fastprerl/objectives.py", "from .models import lm_head_weight", "objectives wall"),
    ("fastprerl/objectives.py", "import transformers", "objectives wall"),
    ("fastprerl/evaluation/periodic.py", "from ..trainer import Trainer", "trainer wall"),
])
def test_a_breached_wall_is_found(tree, where, text, wall):
    _append(tree / where, text)
    assert any(b.startswith(wall) for b in wall_breaches(tree)), wall_breaches(tree)


@pytest.mark.parametrize("where, text", [
    ("fastprerl/state/dcp.py", "from .checkpoint import _sha256"),
    ("fastprerl/trainer.py", "from .state import checkpoint as ckpt_mod\nX = ckpt_mod._discard"),
])
def test_a_private_import_is_found(tree, where, text):
    _append(tree / where, text)
    assert private_reaches(tree), "the planted private import was not found"
