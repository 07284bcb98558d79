"""End-to-end ONNX: uint8 frame in, EfficientNMS-layout detections out, equal to the Python
letterbox + model + NMS path (detect.letterbox / detect.postprocess)."""

import json

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pipeline.eval.coco import coco_eval, to_coco_results
from pipeline.eval.detect import PrePost, letterbox, postprocess
from pipeline.quant import e2e, trt_check, trt_ops

S, NC, N = 64, 5, 84  # the toy detector's input size, classes, anchors
FRAMES = [(320, 320), (480, 640), (720, 1280)]
# TensorRT parses these natively (onnx-tensorrt docs/operators.md, TensorRT 10): what the wrapper may add
E2E_OPS = {"Cast", "Gather", "Mul", "Add", "Div", "Min", "Max", "Unsqueeze", "Transpose", "Pad", "Slice",
           "NonMaxSuppression", "Reshape", "Squeeze", "ScatterND", "TopK", "Greater", "Sub", "Concat", "Where",
           "ReduceSum", "Resize", "Floor"}


def _toy_detector(path, raw: np.ndarray, s: int = S):
    """A detector whose output is the fixed raw tensor (1, 4 + nc, N), plus 0 x the input (so it depends on it)."""
    zero = helper.make_node("ReduceMean", ["images"], ["m"], keepdims=0)
    nodes = [zero, helper.make_node("Mul", ["m", "zero"], ["z"]), helper.make_node("Add", ["raw", "z"], ["output0"])]
    g = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, s, s])],
                          [helper.make_tensor_value_info("output0", TensorProto.FLOAT, list(raw.shape))],
                          initializer=[numpy_helper.from_array(raw.astype(np.float32), "raw"),
                                       numpy_helper.from_array(np.array(0, np.float32), "zero")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, str(path))
    return path


def _raw(seed=0, s=S, nc=NC, n=N):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, s, (n, 2))
    wh = rng.uniform(2, s / 2, (n, 2))
    sc = rng.uniform(0, 1, (n, nc)) ** 4
    return np.concatenate([xy, wh, sc], 1).T[None].astype(np.float32)


def _with_letterbox_output(path):
    """The e2e graph with the letterboxed tensor (the detector's input) as an extra output."""
    import onnxruntime as ort

    m = onnx.load(str(path))
    m.graph.output.append(helper.make_tensor_value_info(e2e.PREFIX + "images", TensorProto.FLOAT, None))
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("hw", [(64, 64), (480, 640), (720, 1280), (640, 427), (100, 133), (17, 500), (333, 640),
                                (1080, 1920), (50, 81)])
@pytest.mark.parametrize("resize", ["cv2", "onnx"])
def test_letterbox_inside_graph_equals_detect_letterbox(tmp_path, hw, resize):
    spec = PrePost(imgsz=S)
    toy = _toy_detector(tmp_path / "toy.onnx", _raw())
    e2e.build_e2e(toy, tmp_path / "e.onnx", hw, spec, resize=resize)
    sess = _with_letterbox_output(tmp_path / "e.onnx")
    img = cv2.GaussianBlur(np.random.default_rng(1).integers(0, 256, (*hw, 3), dtype=np.uint8), (3, 3), 0)
    got = sess.run([e2e.PREFIX + "images"], {"frame": img})[0]
    ref = letterbox(img, spec)[0]
    d = np.abs(got - ref).max() * 255
    if resize == "cv2":
        assert d == 0, f"{hw}: letterbox differs by {d:.3f}/255"  # bit-exact with cv2.resize
    else:  # the Resize op: float weights against cv2's 11-bit ones
        assert d <= 1.0 + 1e-4, f"{hw}: letterbox differs by {d:.3f}/255"


@pytest.mark.parametrize("conf,iou,max_det", [(0.001, 0.7, 300), (0.25, 0.5, 300), (0.05, 0.6, 7), (1.0, 0.7, 300)])
@pytest.mark.parametrize("hw", [(64, 64), (480, 640)])
def test_nms_and_selection_equal_postprocess(tmp_path, conf, iou, max_det, hw):
    """The in-graph NMS + top-max_det + box mapping against detect.postprocess on random raw outputs (many
    overlapping boxes, multi-label candidates), including max_det cutting the list and no detection at all."""
    _selection_equals_postprocess(tmp_path, PrePost(imgsz=S, conf=conf, iou=iou, max_det=max_det), _raw(seed=3), hw)


def _selection_equals_postprocess(tmp_path, spec: PrePost, raw, hw) -> dict:
    """The e2e graph of a toy detector answering `raw`, against detect.postprocess: the same detections, in the same
    (score-descending) order; max_det 7 cuts the list, conf 1.0 leaves none. Returns the graph's description."""
    toy = _toy_detector(tmp_path / "toy.onnx", raw)
    info = e2e.build_e2e(toy, tmp_path / "e.onnx", hw, spec)
    img = np.zeros((*hw, 3), np.uint8)
    got = e2e.run(e2e.session(tmp_path / "e.onnx"), img)
    ref = postprocess(raw, letterbox(img, spec)[1], hw, spec)
    assert got.shape == ref.shape
    if spec.max_det == 7:
        assert len(ref) == 7
    if spec.conf == 1.0:
        assert len(ref) == 0
    assert np.allclose(got, ref, atol=1e-4), np.abs(got - ref).max(0)
    return info


def _raw_xyxy(seed=0, s=S, nc=NC, n=N):
    """A YOLO26-style raw output: x1y1x2y2 boxes, then class scores."""
    raw = _raw(seed, s, nc, n)
    xy, wh = raw[0, :2].copy(), raw[0, 2:4].copy()
    raw[0, :2], raw[0, 2:4] = xy - wh / 2, xy + wh / 2
    return raw


@pytest.mark.parametrize("conf,max_det", [(0.001, 300), (0.25, 300), (0.05, 7), (1.0, 300)])
@pytest.mark.parametrize("hw", [(64, 64), (480, 640)])
def test_topk_selection_equals_postprocess(tmp_path, conf, max_det, hw):
    """YOLO26's tail (no NMS): the in-graph top-K anchors, top-K (anchor, class) pairs and box mapping against
    detect.postprocess's `topk` path, including max_det cutting the list, fewer anchors than max_det (84 < 300: the
    padded slots) and no detection at all."""
    spec = PrePost(imgsz=S, conf=conf, max_det=max_det, post="topk")
    info = _selection_equals_postprocess(tmp_path, spec, _raw_xyxy(seed=5), hw)
    assert info["selection"] == "topk" and "iou" not in info


@pytest.mark.parametrize("trt", ["10.3", "11"])
def test_the_topk_graph_has_no_nms_static_shapes_and_passes_tensorrt_tables(tmp_path, trt):
    toy = _toy_detector(tmp_path / "toy.onnx", _raw_xyxy())
    e2e.build_e2e(toy, tmp_path / "e.onnx", (720, 1280), PrePost(imgsz=S, max_det=50, post="topk"))
    m = onnx.load(str(tmp_path / "e.onnx"))
    ops = {n.op_type for n in m.graph.node if n.name.startswith("e2e/")}
    assert "NonMaxSuppression" not in ops and "TopK" in ops and ops <= E2E_OPS | {"ReduceMax"}
    inf = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    assert all(d.HasField("dim_value") for v in inf.graph.value_info for d in v.type.tensor_type.shape.dim)
    inits = {t.name for t in m.graph.initializer}
    assert all(n.input[1] in inits for n in m.graph.node if n.op_type == "TopK")
    assert not trt_check.check_types(m)
    assert trt_ops.check_ops(m, trt) == []


def test_graph_interface_static_and_standard_ops(tmp_path):
    toy = _toy_detector(tmp_path / "toy.onnx", _raw())
    info = e2e.build_e2e(toy, tmp_path / "e.onnx", (720, 1280), PrePost(imgsz=S, max_det=100))
    assert info["max_det"] == 100 and info["pads_tblr"] == [14, 14, 0, 0]
    m = onnx.load(str(tmp_path / "e.onnx"))
    onnx.checker.check_model(m, full_check=True)
    (inp,) = m.graph.input
    assert inp.name == "frame" and inp.type.tensor_type.elem_type == TensorProto.UINT8
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim] == [720, 1280, 3]
    want = {"num_dets": (TensorProto.INT32, [1, 1]), "boxes": (TensorProto.FLOAT, [1, 100, 4]),
            "scores": (TensorProto.FLOAT, [1, 100]), "classes": (TensorProto.INT32, [1, 100])}
    assert [o.name for o in m.graph.output] == list(want)
    for o in m.graph.output:
        assert (o.type.tensor_type.elem_type, [d.dim_value for d in o.type.tensor_type.shape.dim]) == want[o.name]
    # every op from the standard domain, only ops TensorRT's ONNX parser maps to its own layers (no plugin)
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)
    assert {o.domain for o in m.opset_import} <= {"", "ai.onnx"}
    assert {n.op_type for n in m.graph.node if n.name.startswith("e2e/")} <= E2E_OPS
    assert not trt_check.check_types(m)  # strict typing: TensorRT inserts no casts
    # NMS/TopK constants are initializers (TensorRT needs K and the NMS thresholds at build time)
    inits = {t.name for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "NonMaxSuppression":
            assert all(i in inits for i in n.input[2:])
        if n.op_type == "TopK":
            assert n.input[1] in inits
            assert int(numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == n.input[1]))[0]) \
                < e2e.TRT_TOPK_MAX
    # static everywhere but the NMS selection (data-dependent count, consumed by ScatterND only)
    inf = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    dyn = [v.name for v in inf.graph.value_info
           if any(not d.HasField("dim_value") for d in v.type.tensor_type.shape.dim)]
    assert set(dyn) <= {"post/selected", "post/sel_class", "post/sel_box", "post/cls_off", "post/flat_idx",
                        "post/flat_idx1", "post/kept_scores"}, dyn
    out = e2e.session(tmp_path / "e.onnx").run(None, {"frame": np.zeros((720, 1280, 3), np.uint8)})
    assert [o.dtype for o in out] == [np.int32, np.float32, np.float32, np.int32]


@pytest.mark.parametrize("trt", ["10", "11"], ids=["trt10", "trt11"])
@pytest.mark.parametrize("resize", ["cv2", "onnx"])
def test_graph_passes_the_tensorrt_operator_tables(tmp_path, resize, trt):
    """TensorRT's ONNX operator tables take the graph: every op, type and checkable restriction."""
    toy = _toy_detector(tmp_path / "toy.onnx", _raw())
    e2e.build_e2e(toy, tmp_path / "e.onnx", (720, 1280), PrePost(imgsz=S, max_det=100), resize=resize)
    assert trt_ops.check_ops(onnx.load(str(tmp_path / "e.onnx")), trt) == []


def test_refuses_bad_arguments(tmp_path):
    from pipeline.core.errors import UserError

    toy = _toy_detector(tmp_path / "toy.onnx", _raw())
    with pytest.raises(UserError, match="3840"):
        e2e.build_e2e(toy, tmp_path / "e.onnx", (64, 64), PrePost(imgsz=S), max_det=4000)
    with pytest.raises(UserError, match="imgsz"):
        e2e.build_e2e(toy, tmp_path / "e.onnx", (64, 64), PrePost(imgsz=320))


# ------------------------------------------------------------------ the shipped model, FP32 and INT8 (slow)
@pytest.fixture(scope="module")
def fp32_onnx(tmp_path_factory):
    from conftest import BASE_CKPT

    from pipeline.adapters import ultralytics_yolo as ua

    if not BASE_CKPT.is_file():
        pytest.skip(f"{BASE_CKPT} is absent: `make base` makes it")
    return ua.export_onnx(BASE_CKPT, tmp_path_factory.mktemp("e2e") / "m.onnx", imgsz=320, opset=17, simplify=True)


@pytest.fixture(scope="module")
def int8_onnx(tmp_path_factory, fp32_onnx):
    from pipeline.data.synthetic import SynthSpec, generate
    from pipeline.quant import ort_qdq as oq

    d = tmp_path_factory.mktemp("e2e_q")
    ds = generate(d / "ds", SynthSpec(seed=11, train=8, val=1))
    calib = np.concatenate([letterbox(cv2.imread(str(p)), PrePost(imgsz=320))[0]
                            for p in sorted((ds / "images" / "train").glob("*.jpg"))])
    exclude = oq.head_decode_nodes(onnx.load(str(fp32_onnx)), ["detect-decode"])
    cache = oq.compute_ranges(fp32_onnx, calib, "minmax", d / "minmax.json", d, decode=exclude)
    return oq.quantize(fp32_onnx, d / "int8.onnx", cache, "minmax", exclude)


def _frames(val_synth, n=12):
    """n val images placed (scaled, top-left, grey 60 around) into each frame size, with the ground truth moved."""
    gt = json.loads((val_synth / "annotations" / "instances_val.json").read_text())
    ims = gt["images"][:n]
    out = {}
    for h, w in FRAMES:
        frames, images, anns = [], [], []
        for im in ims:
            img = cv2.imread(str(val_synth / "images" / "val" / im["file_name"]))
            r = min(h / img.shape[0], w / img.shape[1])
            if (h, w) != img.shape[:2]:
                sub = cv2.resize(img, (round(img.shape[1] * r), round(img.shape[0] * r)))
                img = np.full((h, w, 3), 60, np.uint8)
                img[:sub.shape[0], :sub.shape[1]] = sub
            frames.append(img)
            images.append({**im, "width": w, "height": h})
            anns += [{**a, "bbox": [v * r for v in a["bbox"]], "area": a["area"] * r * r}
                     for a in gt["annotations"] if a["image_id"] == im["id"]]
        out[(h, w)] = (frames, {**gt, "images": images, "annotations": anns})
    return out, [c["id"] for c in gt["categories"]]


@pytest.fixture(scope="module")
def frames(val_synth):
    return _frames(val_synth)


@pytest.mark.slow
@pytest.mark.parametrize("hw", FRAMES, ids=[f"{h}x{w}" for h, w in FRAMES])
@pytest.mark.parametrize("conf", [0.001, 0.25], ids=["bench-conf", "deploy-conf"])
@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_e2e_matches_the_python_path(request, which, conf, hw, frames, tmp_path):
    """The one-graph file against the Python path around the same model (letterbox, ORT, NMS, boxes scaled back),
    per frame size and confidence: every confident Python detection has a same-class e2e box within 1 px, the
    detection counts agree, and mAP50-95 within 0.001. conf 0.001 is the bench's accuracy setting, 0.25 a deploy one."""
    from pipeline.backends.onnxruntime import OnnxRuntimeRunner

    model = request.getfixturevalue(f"{which}_onnx")
    runner = OnnxRuntimeRunner(model, threads=2)
    (by_size, cat_ids), spec = frames, PrePost(imgsz=320, conf=conf)
    imgs, gt = by_size[tuple(hw)]
    path = tmp_path / "e2e.onnx"
    e2e.build_e2e(model, path, tuple(hw), spec)
    sess = e2e.session(path)
    py_dets, e2e_dets, checked = [], [], 0
    for img, im in zip(imgs, gt["images"]):
        x, undo = letterbox(img, spec)
        ref = postprocess(runner.infer({runner.input_name: x})[0], undo, tuple(hw), spec)
        got = e2e.run(sess, img)
        for d in ref[ref[:, 4] > 0.01]:
            same = got[got[:, 5] == d[5]]
            assert len(same), f"a class-{int(d[5])} detection is missing"
            px = np.abs(same[:, :4] - d[:4]).max(1).min()
            assert px <= 1.0, f"nearest same-class e2e box is {px:.2f} px away"
            checked += 1
        assert abs(len(got) - len(ref)) <= max(2, len(ref) // 100)
        py_dets += to_coco_results(ref, im["id"], cat_ids)
        e2e_dets += to_coco_results(got, im["id"], cat_ids)
    m_py, m_e2e = coco_eval(gt, py_dets)["map50_95"], coco_eval(gt, e2e_dets)["map50_95"]
    assert abs(m_py - m_e2e) <= 0.001, f"mAP {m_e2e:.4f} vs Python {m_py:.4f}"
    assert checked > 20 and m_py > 0.2  # a comparison that tests something


@pytest.mark.slow
def test_the_int8_e2e_graph_stays_a_file_tensorrt_builds(int8_onnx, tmp_path):
    e2e.build_e2e(int8_onnx, tmp_path / "q_e2e.onnx", (720, 1280), PrePost(imgsz=320))
    m = onnx.load(str(tmp_path / "q_e2e.onnx"))
    assert not trt_check.check(m), trt_check.check(m)  # still a file TensorRT's explicit quantization builds
    assert trt_ops.check_ops(m, "10") == [] and trt_ops.check_ops(m, "11") == []
    assert sum(n.op_type == "DequantizeLinear" for n in m.graph.node) > 50
