"""`yolo-edge init`: a short recipe for a user's data and checkpoint that `yolo-edge run` completes, the plan it
prints, its refusals; the schema's defaults are the recommended fine-tune; a recipe whose shipped sparsity weights
do not fit its model or data says so, with the estimated time, before training them."""

import json
from pathlib import Path

import onnx
import pytest
import yaml
from conftest import ROOT, cli

from pipeline.core.config import Recipe, load_recipe
from pipeline.core.errors import UserError

# what keeps `yolo-edge run` of a written recipe affordable here (the recipe itself is left as init wrote it)
SHRINK = ["--set", "finetune.epochs=1", "--set", "bench.max_rounds=1", "--set", "bench.warmup=1",
          "--set", "prune.mode=uniform", "--set", "prune.reconstruct.enabled=false"]  # the refit: 1-2 min here


def _assert_clean_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def _comment_of(text: str, key: str) -> str:
    """The comment on a recipe key's line; a dotted key ("quantize.enabled") is looked up under its sections."""
    *sections, key = key.split(".")
    lines = iter(text.splitlines())
    for depth, s in enumerate(sections):
        next(ln for ln in lines if ln.startswith("  " * depth + f"{s}:"))
    line = next(ln for ln in lines if ln.strip().startswith(f"{key}:"))
    return line.split("#", 1)[1] if "#" in line else ""


def test_schema_defaults_are_the_recipe_measured_best_on_real_photos():
    """A recipe that sets only data and model prunes and fine-tunes as models/bccd.yaml does (the settings measured
    on BCCD's photos; ultralytics' auto optimizer, nbs 64 and a bias warm-up from 0.1 took a pruned model from 0.35
    to 0.01 mAP in one epoch)."""
    b, r = load_recipe(ROOT / "models/bccd.yaml"), Recipe()
    for k in ("optimizer", "lr0", "nbs", "warmup_bias_lr", "warmup_epochs", "close_mosaic", "batch", "distill"):
        assert getattr(r.finetune, k) == getattr(b.finetune, k), k
    for k in ("mode", "round_to", "importance", "macs_target", "reconstruct"):
        assert getattr(r.prune, k) == getattr(b.prune, k), k
    assert Recipe().prune.macs_at_most is True and Recipe().prune.reconstruct.enabled is True
    # sparsity training before the cut: on, with bccd.yaml's measured schedule (the most accurate cut on BCCD)
    assert r.prune.sparsity.enabled is True and r.prune.sparsity.phases == b.prune.sparsity.phases


def test_finetune_length_follows_the_number_of_train_images(tmp_path):
    from pipeline.init_recipe import default_out, finetune_epochs

    assert finetune_epochs(4) == 100 and finetune_epochs(480) == 63 and finetune_epochs(118_287) == 5
    assert default_out(tmp_path / "coco8" / "annotations" / "instances_train.json", "w/yolo11s.pt") == \
        Path("models/coco8-yolo11s.yaml")
    assert default_out(tmp_path / "my data" / "data.yaml", "yolo11n.yaml") == Path("models/my-data-yolo11n.yaml")


def test_init_reads_sizes_and_checks_classes(synth_small, base_ckpt):
    from pipeline.init_recipe import read_inputs

    inp = read_inputs(synth_small, "yolo11n.yaml", None)  # an architecture: ultralytics' 640
    assert inp.imgsz == 640 and inp.n_train == 24 and inp.n_val == 12 and len(inp.names) == 8
    assert read_inputs(synth_small, str(base_ckpt), None).imgsz == 320  # the checkpoint's training size
    assert read_inputs(synth_small, str(base_ckpt), 256).imgsz == 256
    with pytest.raises(UserError, match="input size 300 is not a multiple of the model.s largest stride 32"):
        read_inputs(synth_small, str(base_ckpt), 300)
    with pytest.raises(UserError, match="no train images"):
        read_inputs(synth_small / "annotations" / "instances_val.json", str(base_ckpt), None)


def test_init_writes_only_what_differs_and_a_gpu_recipe_trains_there(tmp_path):
    """The recipe's keys (device and workers for a GPU, sparsity when asked for) render to YAML that reads back as
    the same recipe, without the defaults it does not need."""
    from pipeline.init_recipe import Inputs, recipe_values, render

    inp = Inputs(names=["a", "b"], n_train=500, n_val=50, n_images=550, model=None, imgsz=640, imgsz_from="x",
                 is_yaml=False)
    v = recipe_values("r", tmp_path / "d", "w.pt", inp, "0", True)
    assert v["finetune"]["device"] == "0" and v["finetune"]["epochs"] == 60  # ceil(30000 / 500)
    sp = v["prune"]["sparsity"]  # workers: min(8, cores), written where that is not the default 2
    assert sp["enabled"] is True and sp["device"] == "0" and sp.get("workers") == v["finetune"].get("workers")
    assert "quantize" not in v and "optimizer" not in v["finetune"]  # 500 train images calibrate; the default
    out = tmp_path / "r.yaml"
    out.write_text(render(v, {"finetune.epochs": "why"}, ["header"]))
    r = load_recipe(out)
    assert r.finetune.device == "0" and r.prune.sparsity.device == "0" and r.model.weights == "w.pt"
    assert r.model.imgsz == 640 and "epochs: 60" in out.read_text() and "# why" in out.read_text()
    off = recipe_values("r", tmp_path / "d", "w.pt", inp, "cpu", False)
    assert off["finetune"] == {"epochs": 60} and off["prune"] == {"sparsity": {"enabled": False}}
    # on is the default and still written: the line a user reads to learn what the cut's extra training is
    assert recipe_values("r", tmp_path / "d", "w.pt", inp, "cpu", True)["prune"] == {"sparsity": {"enabled": True}}


@pytest.mark.slow
def test_init_refuses_to_overwrite_a_recipe(tmp_path, synth_small):
    out = tmp_path / "mine.yaml"
    out.write_text("name: mine\n")
    r = cli("init", "--data", synth_small, "--weights", "yolo11n.yaml", "--out", out)
    _assert_clean_error(r, str(out), "exists already", "--force")
    assert out.read_text() == "name: mine\n"
    import torch

    if not torch.cuda.is_available():  # a device this machine lacks: said before anything is read or timed
        r = cli("init", "--data", synth_small, "--weights", "yolo11n.yaml", "--out", tmp_path / "gpu.yaml",
                "--device", "0")
        _assert_clean_error(r, "device '0': no such CUDA device here")
        assert not (tmp_path / "gpu.yaml").exists()


@pytest.mark.slow
def test_init_refuses_a_checkpoint_for_other_classes(tmp_path, needs_shared, base_ckpt):
    r = cli("init", "--data", needs_shared, "--weights", base_ckpt, "--out", tmp_path / "r.yaml")
    _assert_clean_error(r, "predicts 8 classes but the dataset has 80")
    assert not (tmp_path / "r.yaml").exists()


@pytest.mark.slow(seconds=100)
def test_init_on_synthetic_data_writes_a_recipe_that_runs(tmp_path, synth_small, base_ckpt):
    out = tmp_path / "synth.yaml"
    r = cli("init", "--data", synth_small, "--weights", base_ckpt, "--out", out, "--no-sparsity")
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    rec = load_recipe(out)
    assert rec.name == "synth" and rec.data.source == str(synth_small) and rec.model.weights == str(base_ckpt)
    assert rec.model.imgsz == 320 and "8 classes (circle, square, triangle" in text
    assert rec.finetune.epochs == 100 and "30000 / 24 train images" in _comment_of(text, "epochs")
    assert rec.prune.sparsity.enabled is False and rec.quantize.enabled is False  # 24 < calib.min_count
    assert rec.finetune.optimizer == "AdamW" and rec.finetune.lr0 == 1e-3  # the defaults, not written
    assert rec.finetune.distill.enabled and rec.prune.mode == "latency" and rec.prune.round_to == 16
    assert len([ln for ln in text.splitlines() if ln and not ln.startswith("#")]) <= 20
    plan = r.stdout
    for stage in ("data", "load", "prune", "finetune", "export", "bench", "total"):
        assert any(ln.split()[:1] == [stage] and "~" in ln for ln in plan.splitlines()), (stage, plan)
    assert "sparsity training: off (--sparsity: 80 epochs" in plan and "one timed training batch" in plan

    run = tmp_path / "run"
    r = cli("run", "--recipe", out, "--run-dir", run, *SHRINK)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run / "report.json").is_file() and "| pruned-fp32 |" in (run / "report.md").read_text()


@pytest.mark.slow(seconds=40)
def test_init_on_coco8_as_coco_json_writes_a_recipe_that_reads_its_data_and_model(tmp_path, needs_shared):
    """COCO JSON with COCO's 80 category ids and an untrained architecture: the recipe init writes takes the data,
    load and export stages (the whole run on a written recipe: test_init_on_synthetic_data_writes_a_recipe_that_runs;
    bench on coco8: test_pipeline)."""
    from pipeline.data.formats import load_dataset, write_coco

    coco = write_coco(load_dataset(needs_shared), tmp_path / "coco8")
    out = tmp_path / "c8.yaml"
    r = cli("init", "--data", coco, "--weights", "yolo11n.yaml", "--out", out, "--imgsz", "320")
    assert r.returncode == 0, r.stderr[-3000:]
    rec = load_recipe(out)
    text = out.read_text()
    assert rec.model.arch == "yolo11n.yaml" and rec.model.weights is None and rec.model.imgsz == 320
    assert "80 classes (person, bicycle, car" in text and "4 train / 4 val images" in text
    assert rec.quantize.enabled is False and "calib.min_count" in _comment_of(text, "quantize.enabled")
    assert rec.prune.sparsity.enabled is True
    assert "80 epochs before the cut" in _comment_of(text, "prune.sparsity.enabled")
    assert "INT8: off" in r.stdout and "untrained weights" in r.stdout

    run = tmp_path / "run"
    r = cli("run", "--recipe", out, "--run-dir", run, "--stages", "data,load,export", *SHRINK)
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads((run / "export" / "record.json").read_text())
    m = onnx.load(str(run / "export" / rec["outputs"]["onnx"]["rel"]))
    assert m.graph.output[0].type.tensor_type.shape.dim[1].dim_value == 4 + 80  # boxes + COCO's 80 class scores
    assert yaml.safe_load(out.read_text())["finetune"]["epochs"] == 100  # --set changed the run, not the file


@pytest.mark.slow
def test_mismatched_shipped_sparse_weights_say_so_with_the_time_before_training(tmp_path, base_ckpt, monkeypatch,
                                                                                capsys):
    """The default's shipped sparsity weights named by a run on other data: one line naming the file, what differs
    and the estimated training time, before training starts (here: instead of it)."""
    from pipeline.core.stage import Context
    from pipeline.stages import data, load, sparsity

    shipped = "models/base/yolo11n-synth-next.sparse.pt"
    if not (ROOT / shipped).is_file():
        pytest.skip(f"{shipped} is absent: `make sparse` makes it")
    monkeypatch.chdir(ROOT)
    sets = ["data.synthetic.train=8", "data.synthetic.val=4", "data.synthetic.imgsz=160", "model.imgsz=160",
            f"model.weights={base_ckpt}", "prune.sparsity.phases=[{epochs: 2, reg: 0.01}, {epochs: 3, reg: 0.02}]",
            "prune.sparsity.batch=8"]
    ctx = Context(run_dir=tmp_path / "run", recipe=load_recipe(ROOT / "models/default.yaml", sets),
                  recipe_path=ROOT / "models/default.yaml")
    data.run(ctx)
    load.run(ctx)

    class Started(Exception):
        pass

    def train(*a, **k):
        raise Started

    monkeypatch.setattr(sparsity, "train", train)
    capsys.readouterr()
    with pytest.raises(Started):
        sparsity.sparse_weights(ctx, ctx.output("load", "model"), ctx.output("data", "yolo"))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "sparsity training:" in ln]
    assert len(lines) == 1, lines
    line = lines[0]
    assert shipped in line and "other data" in line and "other model weights" not in line
    assert "other prune.sparsity settings: " in line and "phases" in line and "imgsz" in line
    assert "from the start: 2 phase(s), 5 epochs" in line and "estimated from one timed batch" in line
