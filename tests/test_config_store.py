import json

import pytest
from conftest import ROOT

from pipeline.core.config import load_recipe
from pipeline.core.errors import UserError
from pipeline.core.store import atomic_dir, atomic_path, sha256_file


def test_default_recipe_loads_and_overrides():
    r = load_recipe(ROOT / "models/default.yaml", ["bench.max_rounds=7", "model.imgsz=256"])
    assert r.bench.max_rounds == 7 and r.model.imgsz == 256
    assert r.data.source == "synthetic"


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "models").glob("*.yaml")))
def test_every_shipped_recipe_loads_and_names_its_run(recipe):
    r = load_recipe(ROOT / "models" / recipe, [])
    assert r.name == recipe.removesuffix(".yaml")  # runs/<name>: two recipes never share a run directory
    if recipe == "bccd-3x.yaml":
        assert r.prune.target.kind == "macs" and r.prune.target.value <= 1 / 3 and r.data.selection.images > 0


def test_a_device_index_reads_as_ultralytics_takes_it():
    """`--set base.device=0` (how ultralytics users name a GPU) parses as an int: it becomes "0", not a refusal."""
    sets = ["base.device=0", "prune.sparsity.device=0", "finetune.device=cuda:0"]
    r = load_recipe(ROOT / "models/default.yaml", sets)
    assert (r.base.device, r.prune.sparsity.device, r.finetune.device) == ("0", "0", "cuda:0")
    with pytest.raises(UserError, match="base.device"):
        load_recipe(ROOT / "models/default.yaml", ["base.device=true"])


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nbench:\n  itres: 5\n")
    with pytest.raises(UserError) as e:
        load_recipe(p)
    assert "bench.itres" in str(e.value) and str(p) in str(e.value)
    with pytest.raises(UserError, match="unknown recipe key 'bench.nope'"):
        load_recipe(ROOT / "models/default.yaml", ["bench.nope=1"])


def test_bad_value_is_named(tmp_path):
    with pytest.raises(UserError, match="bench.max_rounds"):
        load_recipe(ROOT / "models/default.yaml", ["bench.max_rounds=0"])
    with pytest.raises(UserError, match="bench.inject_slowdown.*at least 1"):
        load_recipe(ROOT / "models/default.yaml", ["bench.inject_slowdown={pruned-fp32: 0.5}"])


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    dest = tmp_path / "a.json"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_dir_keeps_old_dir_on_interrupt(tmp_path):
    dest = tmp_path / "stage"
    dest.mkdir()
    (dest / "f").write_text("good")
    with pytest.raises(KeyboardInterrupt), atomic_dir(dest) as tmp:
        (tmp / "f").write_text("partial")
        raise KeyboardInterrupt
    assert (dest / "f").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]
    with atomic_dir(dest) as tmp:
        (tmp / "g").write_text("new")
    assert [p.name for p in dest.iterdir()] == ["g"]


def test_stage_cache_is_by_content_and_interrupt_keeps_record(tmp_path):
    from pipeline.core.config import Recipe
    from pipeline.core.stage import Context, StageResult, run_stage

    ctx = Context(run_dir=tmp_path / "run", recipe=Recipe(), recipe_path=ROOT / "models/default.yaml")
    src = tmp_path / "in.txt"
    src.write_text("v1")
    calls = []

    def fn(ctx, out, inputs):
        calls.append(1)
        (out / "o.txt").write_text(inputs["x"].read_text().upper())
        return StageResult(outputs={"o": "o.txt"})

    r1 = run_stage(ctx, "s", 1, {"a": 1}, {"x": src}, fn)
    r2 = run_stage(ctx, "s", 1, {"a": 1}, {"x": src}, fn)
    assert len(calls) == 1 and r1.key == r2.key
    moved = tmp_path / "moved.txt"  # same content at another path: still cached (keys are digests, not paths)
    moved.write_text("v1")
    run_stage(ctx, "s", 1, {"a": 1}, {"x": moved}, fn)
    assert len(calls) == 1
    src.write_text("v2")
    r3 = run_stage(ctx, "s", 1, {"a": 1}, {"x": src}, fn)
    assert len(calls) == 2 and r3.key != r1.key
    assert (ctx.stage_dir("s") / "o.txt").read_text() == "V2"
    assert r3.outputs["o"]["digest"] == sha256_file(ctx.stage_dir("s") / "o.txt")

    def dies(ctx, out, inputs):
        (out / "o.txt").write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(ctx, "s", 2, {"a": 1}, {"x": src}, dies)
    rec = json.loads((ctx.stage_dir("s") / "record.json").read_text())
    assert rec["key"] == r3.key and (ctx.stage_dir("s") / "o.txt").read_text() == "V2"


def test_a_stage_that_succeeds_after_a_failure_removes_the_failed_log(tmp_path):
    """<stage>.failed.log says why the last try failed; once the stage succeeds it is history and goes."""
    from pipeline.core.config import Recipe
    from pipeline.core.errors import UserError
    from pipeline.core.stage import Context, StageResult, run_stage

    ctx = Context(run_dir=tmp_path / "run", recipe=Recipe(), recipe_path=ROOT / "models/default.yaml")
    src = tmp_path / "in.txt"
    src.write_text("v1")

    def fails(ctx, out, inputs):
        print("why it failed")
        raise UserError("a bad input")

    def works(ctx, out, inputs):
        (out / "o.txt").write_text("ok")
        return StageResult(outputs={"o": "o.txt"})

    with pytest.raises(UserError):
        run_stage(ctx, "s", 1, {}, {"x": src}, fails)
    assert "why it failed" in (ctx.run_dir / "s.failed.log").read_text()
    run_stage(ctx, "s", 1, {}, {"x": src}, works)
    assert not (ctx.run_dir / "s.failed.log").exists() and (ctx.stage_dir("s") / "o.txt").read_text() == "ok"


@pytest.fixture
def default_sigint():
    """Ctrl-C raising KeyboardInterrupt, as in the CLI's process (a pytest-xdist worker ignores SIGINT)."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_ctrl_c_while_the_record_is_written_keeps_the_failed_log_and_during_the_swap_keeps_the_stage(
        tmp_path, monkeypatch, default_sigint):
    """Ctrl-C lands anywhere in a stage: before its commit the stage is discarded with its log kept as
    <stage>.failed.log; during the swap into place it is held back until the stage is whole, then raised."""
    import os
    import signal

    import pipeline.core.stage as stage_mod
    import pipeline.core.store as store_mod
    from pipeline.core.config import Recipe
    from pipeline.core.stage import CURRENT, Context, StageResult, run_stage

    ctx = Context(run_dir=tmp_path / "run", recipe=Recipe(), recipe_path=ROOT / "models/default.yaml")
    src = tmp_path / "in.txt"
    src.write_text("v1")

    def fn(ctx, out, inputs):
        print("the stage's own line")
        (out / "o.txt").write_text(inputs["x"].read_text())
        return StageResult(outputs={"o": "o.txt"})

    real_write = stage_mod._write_record

    def interrupted_write(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)  # delivered at the next bytecode: while the record is written
        real_write(*a, **k)

    monkeypatch.setattr(stage_mod, "_write_record", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        run_stage(ctx, "s", 1, {}, {"x": src}, fn)
    assert "the stage's own line" in (ctx.run_dir / "s.failed.log").read_text()
    assert not ctx.stage_dir("s").exists() and CURRENT["stage"] == "s" and CURRENT["log"]
    assert [p.name for p in ctx.run_dir.iterdir()] == ["s.failed.log"]  # no temporary directory left

    monkeypatch.setattr(stage_mod, "_write_record", real_write)
    real_replace = os.replace
    swaps = []

    def interrupted_replace(a, b):
        swaps.append(b)
        os.kill(os.getpid(), signal.SIGINT)
        real_replace(a, b)

    monkeypatch.setattr(store_mod.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        run_stage(ctx, "s", 1, {}, {"x": src}, fn)
    monkeypatch.setattr(store_mod.os, "replace", real_replace)
    assert swaps and json.loads((ctx.stage_dir("s") / "record.json").read_text())["stage"] == "s"
    assert CURRENT["stage"] is None and CURRENT["finished"] == "s"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is given back


@pytest.mark.parametrize("phases,msg", [
    ("[{epochs: 5}]", "reg > 0 .*fade .*or hold"),
    ("[{epochs: 5, fade: 2}, {epochs: 5, reg: 0.01}]", "only the last sparsity phase may fade"),
    ("[{epochs: 5, fade: 2}, {epochs: 5, fade: 2}]", "only the last sparsity phase may fade"),
    ("[{epochs: 5, reg: 0.01}, {epochs: 5, hold: true}]", "must follow the fade phase"),
    ("[{epochs: 5, fade: 2}, {epochs: 5, hold: true, reg: 0.01}]", "neither reg nor fade"),
    ("[{epochs: 5, fade: 6}]", "must not exceed"),
], ids=["no-reg-fade-or-hold", "reg-after-fade", "two-fades", "hold-without-fade", "hold-with-reg",
        "fade-longer-than-phase"])
def test_sparsity_phases_are_checked(phases, msg):
    """A phase must regularize, fade or hold; only the last may fade, and not for longer than it trains; only hold
    phases follow it, and they follow it."""
    with pytest.raises(UserError, match=msg) as e:
        load_recipe(ROOT / "models/default.yaml", [f"prune.sparsity.phases={phases}"])
    assert "\n" not in str(e.value)


def test_sparsity_phases_that_follow_the_rules_load():
    """A fading last phase loads with reg 0, and hold phases may follow it."""
    r = load_recipe(ROOT / "models/default.yaml",
                    ["prune.sparsity.phases=[{epochs: 5, reg: 0.01}, {epochs: 5, fade: 3}]"])
    assert r.prune.sparsity.phases[-1].fade == 3 and r.prune.sparsity.phases[-1].reg == 0
    r = load_recipe(ROOT / "models/default.yaml",
                    ["prune.sparsity.phases=[{epochs: 5, reg: 0.01}, {epochs: 5, fade: 3},"
                     " {epochs: 4, hold: true}, {epochs: 4, hold: true}]"])
    assert [p.hold for p in r.prune.sparsity.phases] == [None, None, True, True]


def test_distillation_and_a_macs_ceiling_key_only_the_sparsity_prefixes_they_change(tmp_path):
    """`distill: true` on a phase puts the distillation loss into the key of the prefixes that contain that phase,
    and only those: records made before the option (no phase distils) keep their keys."""
    from pipeline.core.stage import Context
    from pipeline.stages import sparsity

    base = "{epochs: 5, reg: 0.01}, {epochs: 5, reg: 0.02}"
    def ctx(phases, ceiling=False):
        sets = [f"prune.sparsity.phases=[{phases}]", f"prune.macs_at_most={ceiling}",
                "prune.sparsity.distill.head_weight=2"]
        return Context(run_dir=tmp_path, recipe_path=ROOT / "models/default.yaml",
                       recipe=load_recipe(ROOT / "models/default.yaml", sets))
    plain, kd = ctx(f"{base}, {{epochs: 5, fade: 3}}"), ctx(f"{base}, {{epochs: 5, fade: 3, distill: true}}")
    assert sparsity.settings(plain, 2) == sparsity.settings(kd, 2)  # the shared prefix: same key, reusable
    assert "distill" not in sparsity.settings(plain) and "distill" not in sparsity.settings(kd, 2)
    assert sparsity.settings(kd)["distill"] == {"head_weight": 2.0, "feature_weight": 0.0, "temperature": 1.0}
    assert sparsity.settings(kd)["phases"][-1]["distill"] is True
    assert sparsity.settings(plain) != sparsity.settings(kd)
    # likewise a MACs ceiling joins the planned cut's settings only when asked for
    assert "macs_at_most" not in sparsity.settings(plain)["cut"]
    ceiling = ctx(f"{base}, {{epochs: 5, fade: 3}}", ceiling=True)
    assert sparsity.settings(ceiling)["cut"]["macs_at_most"] is True
    assert sparsity.settings(ceiling, 2) == sparsity.settings(plain, 2)
