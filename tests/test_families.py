"""The model families: YOLOv8, YOLO11 and YOLO26 recognized from their structure, each pruned through every block to
half its MACs at round_to 16 with an exact cut, exported with parity and reloaded by plain `YOLO(path)`; YOLO26's
top-K post-processing against ultralytics' own; what is not a supported family refused in one line."""

import cv2
import numpy as np
import pytest
import torch
from conftest import cli, randomized

from pipeline.adapters import pruning as yp
from pipeline.adapters import ultralytics_yolo as ua
from pipeline.adapters.family import family_named, family_of
from pipeline.core.errors import UserError
from pipeline.eval.detect import PrePost, letterbox, postprocess, topk_select

ASSETS = __import__("pathlib").Path(__import__("ultralytics").__file__).parent / "assets"
FAMILIES = [("yolov8n.yaml", "yolov8"), ("yolo11n.yaml", "yolo11"), ("yolo26n.yaml", "yolo26")]


def _randomized(name, nc=3, seed=0):
    return randomized(name, nc, seed)


def _images(imgsz):
    return torch.from_numpy(np.concatenate([letterbox(cv2.imread(str(ASSETS / n)), PrePost(imgsz=imgsz))[0]
                                            for n in ("bus.jpg", "zidane.jpg")]))


@pytest.mark.parametrize("arch,name", FAMILIES)
def test_the_family_is_read_from_the_structure(arch, name):
    m = ua.build_from_yaml(arch, nc=3)
    fam = family_of(m)
    assert fam.name == name
    assert fam.post == ("topk" if name == "yolo26" else "nms")
    assert family_of(fam.prepare(m)).name == name  # the rewritten form too (pruned checkpoints keep it)
    other = "yolo11" if name == "yolo26" else "yolo26"
    with pytest.raises(UserError, match=f"model.family is {other}, but the model is not one"):
        family_of(m, other)


@pytest.mark.slow(seconds=40)
@pytest.mark.parametrize("arch,name", FAMILIES)
def test_each_family_prunes_to_half_exactly_exports_and_reloads(tmp_path, arch, name):
    """Pruned to <= 0.5x the MACs at round_to 16; with the channels the cut removes zeroed beforehand (their BN weight
    and bias), the cut changes no output on real images: every channel it removes is exactly the one the graph
    says, and every kept channel keeps its weights. Then ONNX export (parity) and plain YOLO(path)."""
    from ultralytics import YOLO

    from pipeline.stages.export import export_checked

    imgsz = 320
    m = _randomized(arch)
    fam = family_named(name)
    pruned, hist, info = yp.prune(m, imgsz, yp.PruneSpec(macs_target=0.5, at_most=True, round_to=16), fam,
                                  log=lambda s: None)
    assert 0.48 <= info["macs_fraction"] <= 0.5, info["macs_fraction"]
    assert info["macs"] == fam.macs_params(pruned, imgsz)[0] < fam.macs_params(m, imgsz)[0]
    before = {c["name"]: c for c in yp.channel_report(fam.prepare(m))}
    cut = [c for c in yp.channel_report(pruned) if c["out"] != before[c["name"]]["out"]]
    assert len(cut) > 20 and all(c["out"] % 16 == 0 for c in cut)  # round_to honoured where channels went
    # the zeroed channels carry nothing: the cut is exact
    zeroed = fam.prepare(m)
    mods = dict(zeroed.named_modules())
    targets = yp.fade_targets(zeroed, hist, imgsz, fam)
    with torch.no_grad():
        for bn, idx in targets.items():
            mods[bn].weight[idx] = 0.0
            mods[bn].bias[idx] = 0.0
        x = _images(imgsz)
        a = fam.deploy_form(zeroed)(x)[0]
        b = fam.deploy_form(pruned)(x)[0]
    assert a.shape == b.shape and a.shape[1] == 4 + 3
    assert (a - b).abs().max() <= 1e-4 * max(1.0, float(a.abs().max()))
    ck = tmp_path / "pruned.pt"
    ua.save_checkpoint(pruned, ck, pruning={"history_file": "history.json"})
    yp.save_history(hist, tmp_path / "history.json")
    ua.check_pruned_checkpoint(ck, imgsz, fam)  # the history replays onto the checkpoint's architecture
    ex = export_checked(ck, tmp_path / "p.onnx", imgsz, 17, True, [ASSETS / "bus.jpg"], 1e-3, fam,
                        dfl_last_axis=True)
    assert ex["family"] == name and ex["parity_max_abs_diff"] <= 1e-3
    reloaded = YOLO(str(ck)).model
    assert fam.signature(reloaded) == fam.signature(pruned)
    assert family_of(reloaded).name == name


@pytest.mark.slow(seconds=10)
def test_yolo26_top_k_post_processing_equals_ultralytics_end_to_end_head():
    """The deployed form's per-anchor output through detect.topk_select gives the detections ultralytics' own
    end-to-end head (its top-K inside the model) gives, on real images."""
    fam = family_named("yolo26")
    m = _randomized("yolo26n.yaml", nc=5, seed=1)
    m.end2end = True  # ultralytics' own inference with the one-to-one head (what `nms=False` selects)
    m.model[-1].max_det = 50
    with torch.no_grad():  # class scores that differ from anchor to anchor (at init they tie in whole regions)
        for seq in m.model[-1].one2one_cv3:
            seq[-1].weight.normal_(0, 0.3)
    # square crops of real photos, no letterbox padding: a padded border gives anchors identical scores, and which
    # of two equal scores a top-K takes first is unspecified
    crops = []
    for n in ("bus.jpg", "zidane.jpg"):
        img = cv2.imread(str(ASSETS / n))
        side = min(img.shape[:2])
        crops.append(cv2.resize(img[:side, :side], (320, 320))[..., ::-1].transpose(2, 0, 1) / 255.0)
    x = torch.from_numpy(np.stack(crops).astype(np.float32))
    with torch.no_grad():
        ref = m(x)[0].numpy()  # (B, 50, 6): x1 y1 x2 y2 score class
        raw = fam.deploy_form(m)(x)[0].numpy()  # (B, 4 + nc, anchors)
    assert ref.shape == (2, 50, 6) and raw.shape[1] == 4 + 5
    def canon(d, floor):  # in score order; anchors of equal score (they occur) by class and box
        d = d[d[:, 4] > floor]
        return d[np.lexsort((d[:, 3], d[:, 2], d[:, 1], d[:, 0], d[:, 5], -d[:, 4]))]

    for i in range(2):
        p = raw[i].T
        a, j, sc = topk_select(p, 50)
        got = np.concatenate([p[a, :4], sc[:, None], j[:, None]], 1)
        assert np.allclose(got[:, 4], ref[i][:, 4], atol=1e-6)  # the same scores, best first
        floor = ref[i][-1, 4]  # which of the anchors tied at the cut-off score each keeps is unspecified
        g, r = canon(got, floor), canon(ref[i], floor)
        assert len(g) == len(r) > 30 and np.allclose(g, r, atol=1e-3), np.abs(g - r).max(0)
    # and postprocess: the same detections over conf, mapped back to the frame (no letterbox offset here)
    spec = PrePost(imgsz=320, conf=float(np.median(ref[0, :, 4])), max_det=50, post="topk")
    out = postprocess(raw[:1], (1.0, 1.0, 0, 0), (320, 320), spec)
    keep = ref[0][ref[0][:, 4] > spec.conf]
    keep[:, :4] = keep[:, :4].clip(0, 320)
    assert len(out) == len(keep) > 0
    assert np.allclose(canon(out, spec.conf), canon(keep, spec.conf), atol=1e-3)


@pytest.mark.parametrize("spec,what", [("rtdetr-l.yaml", "ends in RTDETRDecoder, not Detect"),
                                       ("yolo11n-seg.yaml", "ends in Segment, not Detect"),
                                       ("yolo11n-pose.yaml", "ends in Pose, not Detect"),
                                       ("yolov10n.yaml", "YOLOv10's NMS-free head"),
                                       ("yolov5n.yaml", "are not those of a YOLOv8")])
def test_an_unsupported_architecture_is_refused_in_one_line(tmp_path, spec, what):
    r = cli("run", "--stages", "data,load,prune", "--run-dir", tmp_path / "run", "--set", f"model.weights={spec}",
            "--set", "data.synthetic.train=8", "--set", "data.synthetic.val=4")
    assert r.returncode == 2, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert spec in lines[0] and what in lines[0], lines[0]
    assert not (tmp_path / "run" / "load").exists()  # refused before any work


@pytest.mark.slow(seconds=15)
def test_a_segmentation_checkpoint_is_refused_by_name(tmp_path):
    from ultralytics.nn.tasks import SegmentationModel

    m = SegmentationModel("yolo11n-seg.yaml", nc=2, verbose=False)
    torch.save({"model": m, "ema": None}, tmp_path / "seg.pt")
    r = cli("run", "--stages", "data,load", "--run-dir", tmp_path / "run", "--set", f"model.weights={tmp_path}/seg.pt",
            "--set", "data.synthetic.train=8", "--set", "data.synthetic.val=4")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "seg.pt" in r.stderr and "SegmentationModel" in r.stderr


@pytest.fixture(scope="module")
def yolo26_run(tmp_path_factory):
    """Every stage of the default recipe's shape on small data for a YOLO26n (random weights, its class head scaled up
    so scores differ between anchors and between precisions): (run dir, report.json)."""
    import json

    from pipeline.data.synthetic import CLASSES

    d = tmp_path_factory.mktemp("y26")
    m = _randomized("yolo26n.yaml", nc=len(CLASSES), seed=2)
    with torch.no_grad():
        for seq in m.model[-1].one2one_cv3:
            seq[-1].weight.normal_(0, 0.3)
    m.names = dict(enumerate(CLASSES))
    ua.save_checkpoint(m, d / "yolo26n.pt")
    run = d / "run"
    sets = ["data.synthetic.train=32", "data.synthetic.val=16", "finetune.epochs=1", "finetune.batch=8",
            "bench.max_rounds=1", "bench.warmup=1", f"model.weights={d / 'yolo26n.pt'}", "calib.count=16",
            "calib.min_count=16", "calib.tuning_images=8", "quantize.accuracy_aware.max_float=2",
            "quantize.accuracy_aware.min_float=2", "quantize.accuracy_aware.shortlist=2",
            "quantize.accuracy_aware.probe_images=2", "prune.mode=uniform", "prune.sparsity.enabled=false",
            "data.selection.images=8"]
    r = cli("run", "--run-dir", run, *[a for s in sets for a in ("--set", s)])
    assert r.returncode == 0, r.stderr[-3000:]
    return run, json.loads((run / "report.json").read_text())


@pytest.mark.heavy  # three minutes of one worker: make test-heavy (CI runs it), keeping make test under ten
@pytest.mark.slow(seconds=150)
def test_a_yolo26_goes_through_every_stage_without_nms(yolo26_run):
    """YOLO26 through load, prune, fine-tune (its own loss), export, INT8 (accuracy-aware, ultralytics' peer),
    strongly typed FP16 and INT8+FP16, the e2e graphs (top-K, no NMS op), bench, the bundle and the device bench."""
    import json

    import onnx

    from pipeline.device.bundle_bench import bench as device_bench
    from pipeline.quant import trt_ops

    run, rep = yolo26_run
    assert json.loads((run / "load" / "model.json").read_text())["family"] == "yolo26"
    assert rep["prepost"]["post"] == "topk"
    by = {v["name"]: v for v in rep["variants"] + rep["e2e_variants"]}
    assert {"base-fp32", "pruned-fp32", "pruned-int8", "pruned-ultralytics-int8", "pruned-fp16",
            "pruned-int8-fp16", "pruned-int8-e2e"} <= set(by)
    assert by["pruned-fp32"]["macs"] <= 0.51 * by["base-fp32"]["macs"]
    # the e2e graphs: no NMS op, and their detections are the Python path's
    for name in ("base-fp32", "pruned-fp32", "pruned-int8"):
        e = by[f"{name}-e2e"]
        assert e["e2e"]["selection"] == "topk"
        assert e["map50_95"] == pytest.approx(by[name]["map50_95"], abs=1e-6)
        ops = {n.op_type for n in onnx.load(str(run / e["model"]["path"])).graph.node}
        assert "NonMaxSuppression" not in ops and "TopK" in ops
    # ultralytics' own INT8 export of a YOLO26 ends in its top-K detections: scored as such
    q = json.loads((run / "quantize" / "record.json").read_text())
    assert q["metrics"]["pruned-ultralytics-int8"]["post"] == "final"
    assert by["pruned-ultralytics-int8"]["detections"] > 0
    # a selection split carved out of train: never trained on, every detector variant scored on it too
    meta = json.loads((run / "data" / "dataset.json").read_text())
    assert meta["splits"]["train"] == 24 and meta["splits"]["selection"] == 8
    sel = rep["selection"]
    assert sel["images"] == 8 and set(sel["map50_95"]) == {v["name"] for v in rep["variants"]}
    train = {p.name for p in (run / "data" / "yolo" / "images" / "train").iterdir()}
    assert train.isdisjoint(p.name for p in (run / "data" / "yolo" / "images" / "selection").iterdir())
    assert "selection split (8 train images carved out" in (run / "report.md").read_text()
    cal = json.loads((run / "calibrate" / "record.json").read_text())["metrics"]  # the INT8 search tuned on it
    assert cal["tuning_from"] == "selection" and cal["tuning_images"] == 8
    assert "on 8 selection images (the search's estimate)" in by["pruned-int8"]["note"]
    # the cross-check scored the one-to-one head (nms=False) beside bench
    assert set(rep["cross_check"]["variants"]) == {"base-fp32", "pruned-fp32"}
    # the bundle: every file JetPack 6's TensorRT parses; the device bench (ONNX Runtime) scores what the dev box did
    tree = run / "bundle" / "yolo-edge-bundle"
    m = json.loads((tree / "manifest.json").read_text())
    assert m["prepost"]["post"] == "topk" and "pruned-ultralytics-int8" not in [v["name"] for v in m["variants"]]
    for v in m["variants"]:
        assert trt_ops.check_file(tree / v["file"], "10.3") == []
    dev = device_bench(tree, runner="onnxruntime", out=run / "device_report.json", only=["pruned-int8"],
                       timing={"min_rounds": 1, "max_rounds": 1})
    assert dev["variants"][0]["map50_95"] == pytest.approx(by["pruned-int8"]["map50_95"], abs=1e-6)
