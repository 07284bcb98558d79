"""INT8 explicit Q/DQ: structure, TensorRT rules, calibration methods, calibration-set safety."""

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from conftest import cli
from onnx import numpy_helper

from pipeline.eval.detect import PrePost, letterbox
from pipeline.quant import ort_qdq as oq
from pipeline.quant import trt_check


@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory, base_ckpt_path):
    from pipeline.adapters import ultralytics_yolo as ua

    d = tmp_path_factory.mktemp("q")
    return ua.export_onnx(base_ckpt_path, d / "base.onnx", imgsz=320, opset=17, simplify=True)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    from pipeline.data.synthetic import SynthSpec, generate

    ds = generate(tmp_path_factory.mktemp("cal") / "ds", SynthSpec(seed=11, train=16, val=1))
    imgs = sorted((ds / "images" / "train").glob("*.jpg"))
    return np.concatenate([letterbox(cv2.imread(str(p)), PrePost(imgsz=320))[0] for p in imgs])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, fp32_onnx, calib):
    d = tmp_path_factory.mktemp("qq")
    exclude = oq.head_decode_nodes(onnx.load(str(fp32_onnx)), ["detect-decode"])
    out = {}
    for method in oq.METHODS:
        cache = oq.compute_ranges(fp32_onnx, calib, method, d / f"{method}.json", d, decode=exclude)
        out[method] = (cache, oq.quantize(fp32_onnx, d / f"{method}.onnx", cache, method, exclude))
    return out, exclude


def _init(m):
    return {t.name: numpy_helper.to_array(t) for t in m.graph.initializer}


@pytest.mark.slow
def test_qdq_structure(quantized):
    out, exclude = quantized
    path = out["percentile"][1]
    m = onnx.load(str(path))
    onnx.checker.check_model(m)
    init = _init(m)
    dq_out = {n.output[0]: n for n in m.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in m.graph.node if n.op_type == "Conv"]
    for n in convs:
        if n.name in exclude:
            assert n.input[1] in init, f"excluded {n.name} should keep a float weight"
        else:
            assert n.input[1] in dq_out, f"{n.name}: weight does not come through DequantizeLinear"
    for n in m.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear") and len(n.input) > 2:
            zp = init[n.input[2]]
            assert zp.dtype == np.int8 and not zp.any(), n.name
        if n.op_type == "DequantizeLinear":
            assert init.get(n.input[0], np.zeros(1, np.int8)).dtype != np.int32, f"int32 bias DQ {n.name}"
    for n in m.graph.node:
        if n.name in exclude:
            assert not any(i in dq_out for i in n.input), f"head decode node {n.name} is quantized"
    assert {"/model.23/dfl/conv/Conv", "/model.23/Sigmoid"} <= set(exclude)
    import onnxruntime as ort

    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y = s.run(None, {s.get_inputs()[0].name: np.zeros((1, 3, 320, 320), np.float32)})[0]
    assert y.shape == (1, 12, 2100)
    assert trt_check.check_file(path) == []


@pytest.mark.slow  # its module fixture exports, calibrates and quantizes the shipped base (~30 s)
def test_calibration_methods_really_differ(quantized):
    out, _ = quantized
    ranges = {}
    for method, (cache, _) in out.items():
        d = json.loads(cache.read_text())["data"]
        ranges[method] = {k: float(np.ravel(v["highest"]["data"])[0]) for k, v in d.items()}
    keys = sorted(ranges["minmax"])
    a, e, p = (np.array([ranges[m][k] for k in keys]) for m in ("minmax", "entropy", "percentile"))
    assert np.mean(np.abs(a - e) > 1e-6 * np.abs(a)) > 0.5  # entropy clips most tensors
    assert np.mean(np.abs(a - p) > 1e-6 * np.abs(a)) > 0.5
    assert np.mean(np.abs(e - p) > 1e-6 * np.abs(a)) > 0.5
    assert np.all(e <= a * (1 + 1e-5)) and np.all(p <= a * (1 + 1e-5))  # clipping never widens the range


@pytest.mark.slow
def test_check_trt_refuses_int32_bias_and_asymmetric(tmp_path, fp32_onnx, calib):
    import onnxruntime.quantization as q

    class R:
        def __init__(self):
            self.i = 0

        def get_next(self):
            self.i += 1
            return {"images": calib[self.i - 1: self.i]} if self.i <= 4 else None

    bias = tmp_path / "bias.onnx"
    q.quantize_static(str(fp32_onnx), str(bias), R(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8,
                      extra_options={"ActivationSymmetric": True, "QuantizeBias": True})
    v = trt_check.check_file(bias)
    assert any("int32 DequantizeLinear" in x.rule and "bias" in x.node for x in v), v[:3]
    r = cli("check-trt", bias)
    assert r.returncode == 2 and "TensorRT 10.3 would refuse it" in r.stderr and "node '" in r.stderr
    asym = tmp_path / "asym.onnx"
    q.quantize_static(str(fp32_onnx), str(asym), R(), quant_format=q.QuantFormat.QDQ,
                      activation_type=q.QuantType.QUInt8, weight_type=q.QuantType.QInt8,
                      extra_options={"QuantizeBias": False})
    v = trt_check.check_file(asym)
    assert v and "zero point of type uint8" in v[0].rule
    assert trt_check.check_file(fp32_onnx)[0].rule.startswith("no QuantizeLinear")


@pytest.mark.slow
def test_check_trt_refuses_ultralytics_int8_export(tmp_path, base_ckpt_path):
    from pipeline.adapters import ultralytics_yolo as ua
    from pipeline.data.synthetic import SynthSpec, generate

    ds = generate(tmp_path / "d", SynthSpec(seed=5, train=8, val=1))
    lst = tmp_path / "list.txt"
    lst.write_text("\n".join(str(p) for p in sorted((ds / "images/train").glob("*.jpg"))) + "\n")
    data = tmp_path / "calib.yaml"
    data.write_text(json.dumps({"train": str(lst), "val": str(lst), "names": {i: str(i) for i in range(8)}}))
    peer = ua.export_int8_onnx(base_ckpt_path, tmp_path / "peer.onnx", imgsz=320, data_yaml=data)
    r = cli("check-trt", peer)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "error: " in r.stderr and "node '" in r.stderr.splitlines()[-1]


@pytest.mark.slow
def test_accuracy_aware_returns_nodes_to_float(tmp_path, fp32_onnx, calib):
    """With a zero budget the search must float the nodes it ranks worst, and the file must show it."""
    exclude = oq.head_decode_nodes(onnx.load(str(fp32_onnx)), ["detect-decode"])
    cache = oq.compute_ranges(fp32_onnx, calib, "minmax", tmp_path / "c.json", tmp_path, decode=exclude)
    full = oq.quantize(fp32_onnx, tmp_path / "full.onnx", cache, "minmax", exclude)
    cands = oq.quantized_nodes(onnx.load(str(full)))
    errs = oq.layer_errors(fp32_onnx, full, calib, cands, n_images=2)
    worst = sorted(errs, key=errs.get, reverse=True)[:3]
    assert len(errs) > 50 and errs[worst[0]] > 0
    part = oq.quantize(fp32_onnx, tmp_path / "part.onnx", cache, "minmax", exclude + worst)
    still = set(oq.quantized_nodes(onnx.load(str(part))))
    assert not (set(worst) & still) and len(still) == len(cands) - len(worst)
    assert trt_check.check_file(part) == []


def _calib_run(tmp_path, *sets):
    """The data and calibrate stages (calibrate reads only the data stage's images)."""
    run = tmp_path / "run"
    base = ["--set", "data.synthetic.train=24", "--set", "data.synthetic.val=8", "--set", "prune.enabled=false",
            "--set", "model.weights=yolo11n.yaml"]
    r = cli("run", "--run-dir", run, "--stages", "data,calibrate", *base, *sets)
    return r, run


@pytest.mark.slow
def test_too_small_calibration_set_is_refused(tmp_path):
    r, run = _calib_run(tmp_path, "--set", "calib.count=8", "--set", "calib.min_count=16")
    assert r.returncode == 2 and "only 8 calibration images (< calib.min_count=16)" in r.stderr
    assert not (run / "calibrate").exists()
    r, run = _calib_run(tmp_path, "--set", "calib.count=8", "--set", "calib.min_count=16", "--set", "calib.force=true")
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow
def test_calibration_eval_overlap_is_refused(tmp_path):
    r, run = _calib_run(tmp_path, "--set", "calib.count=8", "--set", "calib.min_count=8")
    assert r.returncode == 0, r.stderr[-2000:]
    val = sorted((run / "data" / "synthetic" / "images" / "val").glob("*.jpg"))
    copy = tmp_path / "sneaky.jpg"
    shutil.copy(val[3], copy)  # a renamed copy: only a content hash can see it
    lst = tmp_path / "calib.txt"
    lst.write_text(str(copy) + "\n")
    r = cli("stage", "calibrate", "--run-dir", run, "--set", "data.synthetic.train=24", "--set",
            "data.synthetic.val=8", "--set", "prune.enabled=false", "--set", "model.weights=yolo11n.yaml",
            "--set", f"calib.source={lst}", "--set", "calib.min_count=1")
    assert r.returncode == 2, r.stderr[-2000:]
    assert "is also an evaluation image" in r.stderr and "sneaky.jpg" in r.stderr


@pytest.mark.slow
def test_the_int8_search_tunes_on_the_selection_split_when_the_recipe_carves_one(tmp_path):
    """data.selection: the accuracy-aware search's tuning images are the selection split (no training saw them),
    never calibration or evaluation images; without one, the train images calibration left over."""
    sets = ["--set", "calib.count=8", "--set", "calib.min_count=8"]
    r, run = _calib_run(tmp_path, *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads((run / "calibrate" / "record.json").read_text())
    assert rec["metrics"]["tuning_from"] == "train" and "tuning_from" not in rec["config"]
    tuning = {Path(i["file_name"]).name
              for i in json.loads((run / "calibrate" / "tuning_gt.json").read_text())["images"]}
    assert len(tuning) == 16  # 24 train - 8 calibration
    r, run = _calib_run(tmp_path, *sets, "--set", "data.selection.images=6")
    assert r.returncode == 0 and "calibrate: running" in r.stderr, r.stderr[-2000:]  # a new key: not the cached set
    rec = json.loads((run / "calibrate" / "record.json").read_text())
    assert rec["metrics"]["tuning_from"] == "selection" and rec["metrics"]["tuning_images"] == 6
    names = lambda split: {p.name for p in (run / "data" / "yolo" / "images" / split).iterdir()}  # noqa: E731
    tuning = {Path(i["file_name"]).name
              for i in json.loads((run / "calibrate" / "tuning_gt.json").read_text())["images"]}
    calib = {Path(p).name for p in (run / "calibrate" / "calib_images.txt").read_text().split()}
    assert tuning == names("selection") and tuning.isdisjoint(names("train")) and tuning.isdisjoint(calib)
    assert calib <= names("train")


@pytest.mark.slow
def test_calibration_tensor_is_rebuilt_when_its_images_change(tmp_path, synth_small):
    data = tmp_path / "userdata"
    shutil.copytree(synth_small, data)
    sets = ["--set", "calib.count=8", "--set", "calib.min_count=8", "--set", f"data.source={data}"]
    r, run = _calib_run(tmp_path, *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    meta = json.loads((run / "calibrate" / "calib.json").read_text())
    r, _ = _calib_run(tmp_path, *sets)
    assert "calibrate: cached" in r.stderr
    victim = __import__("os").path.realpath(run / meta["images"][0]["path"])  # stored relative to the run
    assert victim.startswith(str(data))
    img = cv2.imread(victim)
    img[:40, :40] = 0
    cv2.imwrite(victim, img)
    r, _ = _calib_run(tmp_path, *sets)  # same paths, new bytes: calibrate must re-run, not reuse by path
    assert r.returncode == 0 and "calibrate: running" in r.stderr, r.stderr[-1500:]
    meta2 = json.loads((run / "calibrate" / "calib.json").read_text())
    assert meta2["digest"] != meta["digest"]
    assert [i["path"] for i in meta2["images"]] == [i["path"] for i in meta["images"]]


@pytest.mark.slow
def test_a_moved_run_directory_still_calibrates_and_quantizes_from_its_cache(tmp_path):
    sets = ["--set", "calib.count=8", "--set", "calib.min_count=8", "--set", "calib.tuning_images=8"]
    r, run = _calib_run(tmp_path, *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(run, moved)
    r = cli("run", "--run-dir", moved, "--stages", "data,load,export,calibrate,quantize", "--set",
            "data.synthetic.train=24", "--set", "data.synthetic.val=8", "--set", "prune.enabled=false", "--set",
            "model.weights=yolo11n.yaml", *sets)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "calibrate: cached" in r.stderr and "✓ quantize: " in r.stderr, r.stderr[-2000:]
    assert (moved / "quantize" / "base-int8.onnx").is_file()
