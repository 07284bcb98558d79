"""End to end inside the engine (variant `*-e2e`): one ONNX from a camera frame to final detections.

`build_e2e` wraps a detector ONNX (input 'images' float32 (1, 3, S, S), RGB / 255; output (1, 4 + nc, N): boxes
in input pixels, then class scores; an FP32 export or an INT8 Q/DQ file alike) into one graph, its tail the
family's post-processing (spec.post): for `nms` (YOLOv8, YOLO11; xywh boxes)

    frame uint8 (H, W, 3) BGR
      -> cv2.resize INTER_LINEAR bit for bit (int32 Gather/Mul/Add/Div with cv2's 11-bit weights; or, with
         resize='onnx', one Resize (linear, half_pixel) + round half up) -> Transpose NCHW
      -> Pad (constant 114) -> Gather channels [2, 1, 0] (BGR -> RGB) -> Div 255               # = detect.letterbox
      -> the detector (inlined, names prefixed 'det/')
      -> NonMaxSuppression (class-aware, multi-label: one candidate per (box, class) over conf)
      -> ScatterND of the kept scores into a zero (nc * N,) array -> TopK(max_det)           # static shapes again
      -> boxes x1y1x2y2 in frame pixels (minus pad, over gain, clipped), zero in unused slots
    outputs, EfficientNMS's layout: num_dets int32 (1, 1), boxes float32 (1, K, 4), scores float32 (1, K),
    classes int32 (1, K), K = max_det.

For `topk` (YOLO26's NMS-free one-to-one head; x1y1x2y2 boxes) no NMS op: ReduceMax over classes -> TopK(max_det)
anchors -> Gather their class scores -> TopK(max_det) over those (anchor, class) pairs -> scores over conf valid
(detect.topk_select), then the same boxes-to-frame tail and outputs.

It reproduces detect.letterbox + detect.postprocess: every size is computed at build time from the frame size
and spec.imgsz with letterbox's own rounding; the NMS is ONNX's NonMaxSuppression per class (the Python path's NMS
offsets boxes by class * max_wh, which is the same as per-class NMS) keeping up to max_det per class, then the
max_det best over all classes (what the Python greedy loop's `len(keep) < max_det` stop keeps). Known
differences: with resize='onnx' letterboxed pixels can differ from cv2's by 1/255 for non-integer scale factors
(cv2 uses 11-bit fixed-point weights); the Python path first truncates the candidates to the max_nms (30000) best,
which this graph does not (it matters only past 30000 candidates over conf).

TensorRT (onnx-tensorrt docs/operators.md, TensorRT 10.x operator support matrix): every op used here is parsed
natively into TensorRT layers, no plugin:
- UINT8 is supported only as a network input or output type, and Cast from UINT8 is supported: the frame is Cast
  (to int32 or float) first thing;
- Resize: FP32; modes nearest/linear; transformation modes include half_pixel (letterbox: linear + half_pixel with
  static `sizes`); antialiasing unsupported (the letterbox uses none, like cv2.INTER_LINEAR);
- Pad, Floor, Transpose, Gather, Slice, Div, Mul, Add, Sub, Min, Max, Where, Greater, Cast, ReduceSum, Reshape,
  Squeeze, Unsqueeze, Concat: supported (Add/Mul/Div/Min/Gather also for INT32/INT64; ReduceSum/Squeeze/Unsqueeze
  `axes` must be initializers, they are);
- NonMaxSuppression: supported (FP32/FP16) since TensorRT 8.5 (experimental in 8.4; maps to INMSLayer). Its inputs
  max_output_boxes_per_class, iou_threshold and score_threshold are initializers here, as the 8.4 parser required.
  INMSLayer keeps a "TopK box limit" of candidates per image (default and maximum 5000, 2000 on SM 5.3/6.2, i.e.
  Jetson Nano/TX2; Orin is SM 8.7): at conf 0.001 with many (box, class) pairs over conf TensorRT may drop the
  lowest-scoring candidates beyond 5000 before NMS, which ONNX Runtime and the Python path do not;
- ScatterND: supported (`reduction` none only: the graph's is none; indices are unique (class, box) pairs);
- TopK: supported, `K` must be an initializer and less than 3840 (TensorRT 10.x), `sorted` must be 1: build_e2e
  refuses max_det >= 3840.
The opset of the wrapped graph is the detector's (17 for these exports; NonMaxSuppression needs >= 11, Pad with a
constant-value input >= 11); onnx.checker (full_check) runs on the result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from pipeline.core.errors import UserError
from pipeline.eval.detect import E2E_OUTPUTS as OUTPUTS
from pipeline.eval.detect import PrePost, e2e_detections, letterbox_geometry

PREFIX = "det/"
TRT_TOPK_MAX = 3840  # TopK's K must be less than this (onnx-tensorrt operators.md, TensorRT 10.x)


def _model_io(model: onnx.ModelProto) -> tuple[int, int, int]:
    """(S, nc, N) from the detector's input (1, 3, S, S) and output (1, 4 + nc, N)."""
    if len(model.graph.input) != 1 or len(model.graph.output) != 1:
        raise UserError("the e2e wrapper expects a detector with one input and one output")
    idims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    odims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
    if len(idims) != 4 or idims[:2] != [1, 3] or idims[2] != idims[3] or idims[2] <= 0:
        raise UserError(f"detector input must be static (1, 3, S, S), not {idims}")
    if len(odims) != 3 or odims[0] != 1 or odims[1] <= 4 or odims[2] <= 0:
        raise UserError(f"detector output must be static (1, 4 + nc, N), not {odims}")
    return idims[2], odims[1] - 4, odims[2]


def _cv2_coeffs(n_in: int, n_out: int, clamp: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """cv2.resize INTER_LINEAR's source indices and 11-bit fixed-point weights along one axis (imgproc/resize.cpp:
    fx = float((d + 0.5) * scale - 0.5), sx = floor(fx), weights saturate_cast<short>((1 - fx, fx) * 2048)). Along x
    the weights are clamped at the borders (sx < 0 -> 0 with fx = 0; sx >= n - 1 -> n - 1 with fx = 0); along y only
    the source rows are clamped, the weights are not."""
    scale = 1.0 / (n_out / n_in)
    d = np.arange(n_out, dtype=np.float64)
    f = ((d + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    if clamp:
        lo, hi = s < 0, s >= n_in - 1
        f[lo | hi] = 0
        s[lo], s[hi] = 0, n_in - 1
    w = np.stack([np.rint((np.float32(1) - f) * np.float32(2048)), np.rint(f * np.float32(2048))], 1)
    return np.clip(s, 0, n_in - 1), np.clip(s + 1, 0, n_in - 1), w.astype(np.int32)


def _cv2_linear(node, const, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> str:
    """cv2.resize(INTER_LINEAR) of the uint8 frame, bit-exact, in int32 Gather/Mul/Add/Div: rows gathered first
    (two per output row), each blended horizontally with the x weights (S = a0 * p0 + a1 * p1, exact), then
    vertically as OpenCV's SIMD VResizeLinearVec_32s8u does: ((S0 >> 4) * b0 >> 16) + ((S1 >> 4) * b1 >> 16),
    + 2 >> 2, saturated to [0, 255] (all values are non-negative, so ONNX's truncating integer Div is the shift).
    OpenCV's 2x downscale shortcut (INTER_AREA, (sum + 2) >> 2) gives the same numbers. Returns a float (H', W', 3)
    tensor. Checked against cv2 on up- and downscales in tests/test_e2e.py."""
    (h0, w0), (nh, nw) = src_hw, dst_hw
    y0, y1, b = _cv2_coeffs(h0, nh, clamp=False)
    x0, x1, a = _cv2_coeffs(w0, nw, clamp=True)
    i32 = node("Cast", ["frame"], "pre/int", to=TensorProto.INT32)

    cx0, cx1 = const("pre/x0", x0), const("pre/x1", x1)
    ca0, ca1 = const("pre/a0", a[None, :, 0, None]), const("pre/a1", a[None, :, 1, None])  # (1, nw, 1)

    def hblend(rows: str, tag: str) -> str:  # (nh, W, 3) -> (nh, nw, 3)
        p0 = node("Gather", [rows, cx0], f"pre/{tag}_p0", axis=1)
        p1 = node("Gather", [rows, cx1], f"pre/{tag}_p1", axis=1)
        return node("Add", [node("Mul", [p0, ca0], f"pre/{tag}_m0"), node("Mul", [p1, ca1], f"pre/{tag}_m1")],
                    f"pre/{tag}_h")

    s0 = hblend(node("Gather", [i32, const("pre/y0", y0)], "pre/rows0", axis=0), "r0")
    s1 = hblend(node("Gather", [i32, const("pre/y1", y1)], "pre/rows1", axis=0), "r1")
    c16, c65536 = const("pre/16", np.array(16, np.int32)), const("pre/65536", np.array(65536, np.int32))
    v0 = node("Div", [node("Mul", [node("Div", [s0, c16], "pre/r0_s4"), const("pre/b0", b[:, 0, None, None])],
                           "pre/r0_v"), c65536], "pre/r0_hi")
    v1 = node("Div", [node("Mul", [node("Div", [s1, c16], "pre/r1_s4"), const("pre/b1", b[:, 1, None, None])],
                           "pre/r1_v"), c65536], "pre/r1_hi")
    v = node("Div", [node("Add", [node("Add", [v0, v1], "pre/v"), const("pre/2", np.array(2, np.int32))], "pre/v2"),
                     const("pre/4", np.array(4, np.int32))], "pre/v_shift")
    v = node("Min", [v, const("pre/255i", np.array(255, np.int32))], "pre/v_sat")
    return node("Cast", [v], "pre/float", to=TensorProto.FLOAT)


class _Nodes:
    """The nodes and initializers the wrapper puts around the detector's own graph."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, arr) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str] | str, **attrs) -> str:
        outs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(helper.make_node(op, inputs, outs, name=f"e2e/{outs[0]}", **attrs))
        return outs[0]


def _letterbox(b: _Nodes, frame_hw: tuple[int, int], geo: dict, spec: PrePost, resize: str, det_in: str) -> None:
    """detect.letterbox in ONNX ops: the uint8 frame to the detector's input tensor `det_in`."""
    node, const = b.node, b.const
    h0, w0 = frame_hw
    (nh, nw), (top, bottom, left, right) = geo["new_hw"], geo["pads"]
    if (nh, nw) == (h0, w0):  # letterbox skips cv2.resize at the same size
        x = node("Cast", ["frame"], "pre/float", to=TensorProto.FLOAT)
    elif resize == "cv2":
        x = _cv2_linear(node, const, (h0, w0), (nh, nw))
    elif resize == "onnx":
        # ONNX Resize (linear, half_pixel) in float, rounded half up: bit-exact with cv2 for integer downscale
        # factors (cv2's weights are exact there: 640x480 -> 320x240, 1280x720 -> 320x180, 1920x1080 -> 320x180),
        # within 1/255 otherwise (cv2 quantizes its weights to 11 bits).
        x = node("Cast", ["frame"], "pre/float", to=TensorProto.FLOAT)
        x = node("Resize", [x, "", "", const("pre/sizes", np.array([nh, nw, 3], np.int64))], "pre/resized",
                 mode="linear", coordinate_transformation_mode="half_pixel")
        x = node("Floor", [node("Add", [x, const("pre/half", np.array(0.5, np.float32))], "pre/plus_half")],
                 "pre/rounded")
        x = node("Min", [node("Max", [x, const("pre/lo", np.array(0, np.float32))], "pre/clip_lo"),
                         const("pre/hi", np.array(255, np.float32))], "pre/clipped")
    else:
        raise UserError(f"unknown resize '{resize}' (cv2 or onnx)")
    x = node("Transpose", [node("Unsqueeze", [x, const("pre/axes0", np.array([0], np.int64))], "pre/nhwc")],
             "pre/nchw", perm=[0, 3, 1, 2])
    if any((top, bottom, left, right)):
        x = node("Pad", [x, const("pre/pads", np.array([0, 0, top, left, 0, 0, bottom, right], np.int64)),
                         const("pre/padval", np.array(spec.pad_value, np.float32))], "pre/padded", mode="constant")
    x = node("Gather", [x, const("pre/rgb", np.array([2, 1, 0], np.int64))], "pre/rgb_img", axis=1)  # BGR -> RGB
    node("Div", [x, const("pre/255", np.array(255.0, np.float32))], det_in)


def _nms_candidates(b: _Nodes, det_out: str, nc: int, n: int, k_eff: int, spec: PrePost):
    """`nms` (YOLOv8, YOLO11): NonMaxSuppression on the detector's output det_out (1, 4 + nc, N; boxes xywh), then the
    best k_eff kept (box, class) pairs. Returns (x1y1x2y2 in input pixels (K, 4), scores (K,), classes int64 (K,),
    valid bool (K,))."""
    node, const = b.node, b.const
    xywh = node("Slice", [det_out, const("post/s0", np.array([0], np.int64)), const("post/s4", np.array([4], np.int64)),
                          const("post/ax1", np.array([1], np.int64))], "post/xywh_t")  # (1, 4, N)
    scores = node("Slice", [det_out, "post/s4", const("post/send", np.array([4 + nc], np.int64)), "post/ax1"],
                  "post/cls_scores")  # (1, nc, N)
    boxes = node("Transpose", [xywh], "post/xywh", perm=[0, 2, 1])  # (1, N, 4)
    sel = node("NonMaxSuppression", [boxes, scores, const("post/max_per_class", np.array([k_eff], np.int64)),
                                     const("post/iou", np.array([spec.iou], np.float32)),
                                     const("post/conf", np.array([spec.conf], np.float32))],
               "post/selected", center_point_box=1)  # (M, 3): batch, class, box
    cls_sel = node("Slice", [sel, const("post/c1", np.array([1], np.int64)), const("post/c2", np.array([2], np.int64)),
                             "post/ax1"], "post/sel_class")  # (M, 1)
    box_sel = node("Slice", [sel, "post/c2", const("post/c3", np.array([3], np.int64)), "post/ax1"],
                   "post/sel_box")  # (M, 1)
    flat_idx = node("Add", [node("Mul", [cls_sel, const("post/N", np.array(n, np.int64))], "post/cls_off"), box_sel],
                    "post/flat_idx")  # (M, 1): class * N + box
    flat_scores = node("Reshape", [scores, const("post/flat", np.array([nc * n], np.int64))], "post/flat_scores")
    kept = node("Gather", [flat_scores, node("Squeeze", [flat_idx, "post/ax1"], "post/flat_idx1")],
                "post/kept_scores")  # (M,)
    dense = node("ScatterND", [const("post/zeros", np.zeros(nc * n, np.float32)), flat_idx, kept],
                 "post/dense_scores")  # (nc * N,): kept scores, 0 elsewhere
    top_s, top_i = node("TopK", [dense, const("post/K", np.array([k_eff], np.int64))], ["post/top_s", "post/top_i"],
                        axis=0, largest=1, sorted=1), "post/top_i"
    valid = node("Greater", [top_s, const("post/zero", np.array(0, np.float32))], "post/valid")  # (K,)
    cls = node("Div", [top_i, "post/N"], "post/cls")  # int64 division: floor for non-negative
    box = node("Sub", [top_i, node("Mul", [cls, "post/N"], "post/cls_n")], "post/box")
    bx = node("Gather", [node("Squeeze", [boxes, const("post/ax0", np.array([0], np.int64))], "post/xywh2"), box],
              "post/top_xywh", axis=0)  # (K, 4)
    xy = node("Slice", [bx, "post/s0", const("post/s2", np.array([2], np.int64)), "post/ax1"], "post/xy")
    wh = node("Slice", [bx, "post/s2", "post/s4", "post/ax1"], "post/wh")
    half = node("Div", [wh, const("post/2", np.array(2.0, np.float32))], "post/half")
    xyxy = node("Concat", [node("Sub", [xy, half], "post/x1y1"), node("Add", [xy, half], "post/x2y2")],
                "post/xyxy_in", axis=1)
    return xyxy, top_s, cls, valid


def _topk_candidates(b: _Nodes, det_out: str, nc: int, n: int, k_eff: int, spec: PrePost, opset: int):
    """`topk` (YOLO26's one-to-one head, no NMS): detect.topk_select in ONNX ops on det_out (1, 4 + nc, N; boxes
    x1y1x2y2): the k_eff anchors with the best class score (ReduceMax, TopK), then the k_eff best (anchor, class)
    scores among them (TopK over the flattened k_eff x nc block), those over conf valid. Returns as
    `_nms_candidates`."""
    node, const = b.node, b.const
    xyxy_t = node("Slice", [det_out, const("post/s0", np.array([0], np.int64)),
                            const("post/s4", np.array([4], np.int64)), const("post/ax1", np.array([1], np.int64))],
                  "post/xyxy_t")  # (1, 4, N)
    scores = node("Slice", [det_out, "post/s4", const("post/send", np.array([4 + nc], np.int64)), "post/ax1"],
                  "post/cls_scores")  # (1, nc, N)
    ax0 = const("post/ax0", np.array([0], np.int64))
    boxes = node("Squeeze", [node("Transpose", [xyxy_t], "post/xyxy_nt", perm=[0, 2, 1]), ax0], "post/boxes_n")
    sc = node("Squeeze", [node("Transpose", [scores], "post/scores_t", perm=[0, 2, 1]), ax0], "post/scores_n")
    if opset >= 18:  # ReduceMax's axes became an input in opset 18
        best = node("ReduceMax", [sc, "post/ax1"], "post/best", keepdims=0)
    else:
        best = node("ReduceMax", [sc], "post/best", axes=[1], keepdims=0)  # (N,)
    kk = const("post/K", np.array([k_eff], np.int64))
    node("TopK", [best, kk], ["post/anc_s", "post/anc"], axis=0, largest=1, sorted=1)  # (K,): the best anchors
    cand = node("Gather", [sc, "post/anc"], "post/cand", axis=0)  # (K, nc)
    flat = node("Reshape", [cand, const("post/flat", np.array([k_eff * nc], np.int64))], "post/cand_flat")
    top_s, top_i = node("TopK", [flat, kk], ["post/top_s", "post/top_i"], axis=0, largest=1, sorted=1), "post/top_i"
    ncc = const("post/nc", np.array(nc, np.int64))
    row = node("Div", [top_i, ncc], "post/row")  # int64 division: floor for non-negative
    cls = node("Sub", [top_i, node("Mul", [row, ncc], "post/row_nc")], "post/cls")
    anchor = node("Gather", ["post/anc", row], "post/anchor", axis=0)
    xyxy = node("Gather", [boxes, anchor], "post/xyxy_in", axis=0)  # (K, 4)
    valid = node("Greater", [top_s, const("post/conf", np.array(spec.conf, np.float32))], "post/valid")
    const("post/zero", np.array(0, np.float32))
    return xyxy, top_s, cls, valid


def _select(b: _Nodes, det_out: str, nc: int, n: int, k: int, k_eff: int, frame_hw: tuple[int, int], geo: dict,
            spec: PrePost, opset: int) -> None:
    """The family's selection on the detector's output det_out (1, 4 + nc, N) (NMS, or YOLO26's top-K), then the
    best k detections in the frame's pixels: the graph's outputs num_dets, boxes, scores, classes."""
    node, const = b.node, b.const
    h0, w0 = frame_hw
    left, top = geo["pad_xy"]
    gx, gy = geo["gain"]
    if spec.post == "topk":
        xyxy, top_s, cls, valid = _topk_candidates(b, det_out, nc, n, k_eff, spec, opset)
    else:
        xyxy, top_s, cls, valid = _nms_candidates(b, det_out, nc, n, k_eff, spec)
    xyxy = node("Div", [node("Sub", [xyxy, const("post/pad", np.array([left, top, left, top], np.float32))],
                             "post/unpad"),
                        const("post/gain", np.array([gx, gy, gx, gy], np.float32))], "post/xyxy_frame")
    xyxy = node("Min", [node("Max", [xyxy, const("post/bmin", np.zeros(4, np.float32))], "post/clip0"),
                        const("post/bmax", np.array([w0, h0, w0, h0], np.float32))], "post/clip1")
    v2 = node("Unsqueeze", [valid, "post/ax1"], "post/valid2")
    out_boxes = node("Where", [v2, xyxy, "post/zero"], "post/boxes_k")
    out_scores = node("Where", [valid, top_s, "post/zero"], "post/scores_k")
    out_cls = node("Where", [valid, node("Cast", [cls], "post/cls32", to=TensorProto.INT32),
                             const("post/zero_i", np.array(0, np.int32))], "post/classes_k")
    valid32 = node("Cast", [valid], "post/valid32", to=TensorProto.INT32)
    node("ReduceSum", [valid32, "post/ax0"], "post/num1", keepdims=1)  # (1,)
    if k_eff < k:  # fewer candidates than max_det: pad to the promised K slots
        padk = const("post/padk", np.array([0, 0, k - k_eff, 0], np.int64))
        out_boxes = node("Pad", [out_boxes, padk], "post/boxes_p")
        padk1 = const("post/padk1", np.array([0, k - k_eff], np.int64))
        out_scores = node("Pad", [out_scores, padk1], "post/scores_p")
        out_cls = node("Pad", [out_cls, padk1], "post/classes_p")
    node("Unsqueeze", ["post/num1", "post/ax0"], "num_dets")
    node("Unsqueeze", [out_boxes, "post/ax0"], "boxes")
    node("Unsqueeze", [out_scores, "post/ax0"], "scores")
    node("Unsqueeze", [out_cls, "post/ax0"], "classes")


def _assemble(det: onnx.ModelProto, b: _Nodes, n_pre: int, frame_hw: tuple[int, int], k: int,
              opset: int) -> onnx.ModelProto:
    """One graph in topological order (letterbox, the detector, NMS and selection), shape-inferred and checked."""
    h0, w0 = frame_hw
    nodes, inits = b.nodes, b.inits
    g = det.graph
    graph = helper.make_graph(  # topological order: letterbox, detector, NMS and selection
        nodes[:n_pre] + list(g.node) + nodes[n_pre:], "yolo_e2e",
        [helper.make_tensor_value_info("frame", TensorProto.UINT8, [h0, w0, 3])],
        [helper.make_tensor_value_info("num_dets", TensorProto.INT32, [1, 1]),
         helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, k, 4]),
         helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, k]),
         helper.make_tensor_value_info("classes", TensorProto.INT32, [1, k])],
        initializer=list(g.initializer) + inits, value_info=list(g.value_info))
    opsets = [o for o in det.opset_import if (o.domain or "ai.onnx") != "ai.onnx"]
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), *opsets],
                              producer_name="yolo-edge e2e")
    model.ir_version = det.ir_version
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model, full_check=True)
    return model


def build_e2e(model_onnx: Path, dest: Path, frame_hw: tuple[int, int], spec: PrePost,
              max_det: int | None = None, resize: str = "cv2") -> dict:
    """Writes the end-to-end ONNX to `dest`; returns a description (sizes, thresholds, opset).

    resize: 'cv2' (default) reproduces cv2.resize's uint8 INTER_LINEAR bit for bit with integer ops; 'onnx' uses
    the Resize op (one TensorRT resize layer; exact for integer downscale factors, else within 1/255)."""
    model_onnx, dest = Path(model_onnx), Path(dest)
    det = onnx.load(str(model_onnx))
    s, nc, n = _model_io(det)
    if s != spec.imgsz:
        raise UserError(f"detector input is {s}x{s} but the spec's imgsz is {spec.imgsz}", model_onnx)
    k = int(max_det if max_det is not None else spec.max_det)
    if not 0 < k < TRT_TOPK_MAX:
        raise UserError(f"max_det {k} out of range: TensorRT's TopK needs 0 < K < {TRT_TOPK_MAX}")
    k_eff = min(k, n) if spec.post == "topk" else min(k, nc * n)
    h0, w0 = (int(v) for v in frame_hw)
    if h0 <= 0 or w0 <= 0:
        raise UserError(f"frame size {frame_hw} is not a positive (H, W)")
    geo = letterbox_geometry((h0, w0), s)
    (nh, nw), (top, bottom, left, right) = geo["new_hw"], geo["pads"]
    gx, gy = geo["gain"]
    opset = {o.domain or "ai.onnx": o.version for o in det.opset_import}.get("ai.onnx", 17)
    opset = max(opset, 13)

    det = onnx.compose.add_prefix(det, PREFIX)
    b = _Nodes()
    _letterbox(b, (h0, w0), geo, spec, resize, det.graph.input[0].name)
    n_pre = len(b.nodes)  # the detector's graph follows (prefixed)
    _select(b, det.graph.output[0].name, nc, n, k, k_eff, (h0, w0), geo, spec, opset)
    model = _assemble(det, b, n_pre, (h0, w0), k, opset)
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(dest))
    return {"frame_hw": [h0, w0], "imgsz": s, "resized_hw": [nh, nw], "pads_tblr": [top, bottom, left, right],
            "gain_xy": [gx, gy], "nc": nc, "anchors": n, "max_det": k, "conf": spec.conf,
            **({"iou": spec.iou} if spec.post == "nms" else {}), "selection": spec.post, "opset": opset,
            "outputs": list(OUTPUTS)}


def session(path: Path, threads: int = 2):
    """An ONNX Runtime CPU session of an e2e file."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run(sess, frame_bgr: np.ndarray) -> np.ndarray:
    """One frame (uint8 H x W x 3 BGR, the size the graph was built for) -> (k, 6) detections."""
    return e2e_detections(sess.run(list(OUTPUTS), {"frame": np.ascontiguousarray(frame_bgr, dtype=np.uint8)}))
