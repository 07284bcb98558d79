"""The package's shape: no import circles, one stage registry that every list of stages reads.

The import graph is read with the standard library's `ast` from the source, not by importing: it sees the imports
inside functions too (the package imports its heavy libraries lazily, so most of its edges live there), and it
needs no tool beyond Python itself (pydeps draws graphs and import-linter enforces layer contracts; a cycle check
needs neither)."""

from __future__ import annotations

import ast
import inspect
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "pipeline"


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def _targets(mod: str, path: Path, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The package modules an import statement names (`from a.b import c` names a.b.c when c is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:
        pkg = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        pkg = pkg[:len(pkg) - node.level + 1]
        base = ".".join(pkg + ([node.module] if node.module else []))
    return [f"{base}.{a.name}" for a in node.names] + [base]


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for t in _targets(m, path, node):
                    while t and t not in mods and "." in t:
                        t = t.rsplit(".", 1)[0]
                    if t in mods and t != m:
                        graph[m].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        while work:
            u, it = work[-1]
            w = next(it, None)
            if w is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[u])
                if low[u] == index[u]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on.discard(x)
                        comp.append(x)
                        if x == u:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
            elif w not in index:
                index[w] = low[w] = counter[0]
                counter[0] += 1
                stack.append(w)
                on.add(w)
                work.append((w, iter(sorted(graph[w]))))
            elif w in on:
                low[u] = min(low[u], index[w])

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_made_circle_and_a_lazy_import():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    # an import inside a function is an edge too
    tree = ast.parse("def f():\n    from pipeline.stages.bench import run\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert "pipeline.stages.bench" in _targets("pipeline.cli", PKG / "cli.py", node)


def test_the_package_has_no_import_circles():
    g = import_graph()
    assert len(g) > 50 and g["pipeline.cli"], "the graph was not read"
    assert cycles(g) == [], "modules that import each other (directly or round a circle)"


def test_no_stage_imports_a_later_stage():
    from pipeline.stages.order import STAGES

    g = import_graph()
    pos = {f"pipeline.stages.{s}": i for i, s in enumerate(STAGES)}
    late = [(m, t) for m in pos for t in g[m] if t in pos and pos[t] > pos[m]]
    assert late == []


def test_every_list_of_stages_is_the_registry():
    from typer.testing import CliRunner

    from pipeline import cli
    from pipeline.cli import app
    from pipeline.stages.order import RECORDS, STAGES, entry

    assert [entry(s).__module__ for s in STAGES] == [f"pipeline.stages.{s}" for s in STAGES]
    with pytest.raises(KeyError):
        entry("sparsity")
    helped = subprocess.run(["make", "-s", "help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    made = [ln.split()[1] for ln in helped.splitlines() if ln.split()[1:2] and ln.split()[1] in RECORDS]
    assert made == list(STAGES), "the Makefile's per-stage targets"
    assert inspect.signature(cli.run).parameters["stages"].default.default == ",".join(STAGES)
    status = CliRunner().invoke(app, ["status", "--run-dir", "/nonexistent-run"]).output
    assert [ln.split()[0] for ln in status.splitlines()[1:]] == list(RECORDS)


_SNAPSHOT = r"""
import json, os, sys
import torch
import torch.nn.modules.module as tm
def state():
    import torch_pruning as tp
    return {"env": dict(os.environ),
            "hooks": [len(tm._global_parameter_registration_hooks), len(tm._global_buffer_registration_hooks),
                      len(tm._global_forward_hooks), len(tm._global_forward_pre_hooks),
                      len(tm._global_backward_hooks)],
            "tp_update_index_mapping": tp.dependency.index_mapping.update_index_mapping.__qualname__,
            "threads": torch.get_num_threads()}
MODE
"""


def _run(code: str) -> dict:
    import json
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY") and not k.startswith("YOLO_")}
    r = subprocess.run([sys.executable, "-c", _SNAPSHOT.replace("MODE", code)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_importing_the_package_leaves_the_proxies_unset():
    got = _run("import pipeline, pipeline.cli\nprint(json.dumps({k: v for k, v in os.environ.items() "
               "if k.upper().endswith('_PROXY') or k.startswith('YOLO_')}))")
    assert got == {}


def test_importing_every_module_changes_nothing_in_the_process():
    """Every module of the package imported into a process that already imported its libraries (torch, Torch-Pruning,
    ultralytics: what their own imports do is theirs): the environment, torch's global module hooks, Torch-Pruning's
    functions and torch's thread count are what they were. The pruning memo and offline mode are switched on by
    the code that needs them, for as long as it runs (tested below)."""
    mods = sorted(_modules())
    code = ("import ultralytics, torch_pruning\nbefore = state()\nimport importlib\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "after = state()\nprint(json.dumps({'before': before, 'after': after, 'n': len(sys.modules)}))")
    got = _run(code)
    assert got["after"] == got["before"]


def test_the_pruning_memo_and_offline_mode_are_on_only_inside_their_blocks():
    got = _run("from pipeline.adapters import pruning as yp\n"
               "from pipeline.adapters.offline import offline\n"
               "before = state()\n"
               "with yp.fast_index_mapping():\n"
               "    with yp.fast_index_mapping():\n"
               "        inner = state()\n"
               "    still = state()\n"
               "with offline() as cfg:\n"
               "    off = state()\n"
               "print(json.dumps({'before': before, 'inner': inner, 'still': still, 'off': off, 'after': state()}))")
    assert got["inner"]["hooks"][:2] == [h + 1 for h in got["before"]["hooks"][:2]]
    assert got["inner"]["tp_update_index_mapping"].startswith("_memoized")
    assert got["still"] == got["inner"], "a nested block's exit keeps the outer block's patch"
    assert got["off"]["env"]["YOLO_OFFLINE"] == "1" and got["off"]["env"]["HTTPS_PROXY"] == "http://127.0.0.1:9"
    assert got["after"] == got["before"]


def test_only_the_family_registry_imports_a_family_module():
    """Stages (and everything outside adapters/) reach YOLOv8, YOLO11 and YOLO26 through the interface in
    adapters/family.py, never through a family module."""
    g = import_graph()
    fam = "pipeline.adapters.families"
    inside = lambda m: m == "pipeline.adapters.family" or m.startswith(fam)  # noqa: E731
    bad = sorted((m, t) for m in g for t in g[m] if (t == fam or t.startswith(fam + ".")) and not inside(m))
    assert bad == []
    assert any(t.startswith(fam) for t in g["pipeline.adapters.family"])  # the check reads the edges it means


_STR_METHODS = {"endswith", "startswith", "split", "rsplit", "partition", "rpartition", "removesuffix",
                "removeprefix"}
_VARIANT_TOKENS = ("fp32", "fp16", "int8", "e2e", "ptq", "pruned", "base", "peer", "ultralytics")


def name_decisions(source: str) -> list[str]:
    """String-method calls that read a variant's kind from its name: a split on '-' or '_', or a prefix/suffix test
    with a variant word ("-e2e", "fp16", "pruned_"...)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _STR_METHODS):
            continue
        consts = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        consts += [e.value for a in node.args if isinstance(a, ast.Tuple) for e in a.elts
                   if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        split = node.func.attr in ("split", "rsplit", "partition", "rpartition")
        if any((split and c in ("-", "_")) or any(t in c.lower() for t in _VARIANT_TOKENS) for c in consts):
            out.append(f"line {node.lineno}: {ast.unparse(node)}")
    return out


def test_no_variant_is_decided_by_a_string_method_on_its_name():
    """Which network, precision, role or source a variant has is read from the variant table
    (pipeline/core/variants.py), never parsed out of its name."""
    planted = 'model = out.split("_")[0]\nif name.endswith("fp16"): pass\ne = v["name"].endswith("-e2e")\n'
    assert len(name_decisions(planted)) == 3  # the check finds what it is for
    assert name_decisions('p = path.endswith(".onnx")\nk, _, v = line.partition("=")\nk.startswith("_")\n') == []
    found = {str(p.relative_to(ROOT)): hits for p in sorted(PKG.rglob("*.py"))
             if (hits := name_decisions(p.read_text()))}
    assert found == {}


def test_the_registry_holds_each_stage_s_behaviour():
    """Which stages a recipe enables, which check the user's inputs first, how each is entered and estimated: the
    stage specs say it (pipeline/stages/order.py), and the CLI and init's plan read them."""
    from pipeline import estimate
    from pipeline.core.config import load_recipe
    from pipeline.stages.order import REGISTRY, plan, spec

    r = load_recipe(ROOT / "models" / "default.yaml", ["prune.enabled=false", "quantize.enabled=false"])
    assert [s.name for s in REGISTRY if not s.enabled(r)] == ["prune", "finetune", "calibrate", "quantize"]
    assert [s.name for s in REGISTRY if s.preflight] == ["data", "load", "calibrate"]
    assert all(callable(getattr(s.module(), "preflight", None)) == s.preflight for s in REGISTRY)
    assert spec("engine").build and spec("export").records == ("export", "export-pruned")
    t = estimate.Timing(step_s=1.0, load_s=0.1, infer_img_s=0.02, batch=16)
    names = [st.name for st in plan(r, t, estimate.Sizes(480, 120))]
    assert names == ["data", "load", "export", "bench"]
    full = load_recipe(ROOT / "models" / "default.yaml")
    assert [st.name for st in plan(full, t, estimate.Sizes(480, 120))] == [
        "data", "load", "sparsity", "prune", "finetune", "export", "calibrate", "quantize", "bench"]
