"""Explicit INT8 Q/DQ ONNX in the form TensorRT builds, made with ONNX Runtime's static quantizer.

- INT8 symmetric activations and weights (zero points 0), per-channel weights on the output-channel axis,
  biases left float (`QuantizeBias=False`: TensorRT's parser rejects int32 bias DequantizeLinear).
- Q/DQ on the inputs of Conv and MatMul and on residual Adds, where TensorRT fuses them.
- The detection head's decode (DFL, box/score concat, sigmoid, anchor arithmetic) stays float: a named,
  configurable exclusion list.
- Calibration ranges are computed once per method by the project's own calibrator call (ORT's `quantize_static` never
  passes bin counts to its entropy calibrator, so with its defaults 'entropy' gives MinMax's ranges) and fed to
  `quantize_static` as a calibration cache; accuracy-aware iterations re-quantize from it in seconds.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx

from pipeline.core.errors import UserError

METHODS = ("minmax", "entropy", "percentile")
OP_TYPES = ("Conv", "MatMul", "Add")


def _ort_q():
    import onnxruntime.quantization as q
    from onnxruntime.quantization import calibrate as c

    return q, c


class TensorReader:
    """An ONNX Runtime CalibrationDataReader over an (N, 3, H, W) float32 array."""

    def __init__(self, input_name: str, data: np.ndarray):
        self.name, self.data, self.i = input_name, data, 0

    def get_next(self):
        if self.i >= len(self.data):
            return None
        self.i += 1
        return {self.name: self.data[self.i - 1: self.i]}

    def rewind(self):
        self.i = 0

    def __len__(self):
        return len(self.data)


def detect_prefix(model: onnx.ModelProto) -> str:
    """The '/model.N/' prefix of the Detect head: the module that produces the graph output."""
    out = model.graph.output[0].name
    producer = {o: n for n in model.graph.node for o in n.output}
    seen, stack = set(), [out]
    while stack:
        t = stack.pop()
        n = producer.get(t)
        if n is None or n.name in seen:
            continue
        seen.add(n.name)
        m = re.match(r"(/model\.\d+/)", n.name)
        if m:
            return m.group(1)
        stack.extend(n.input)
    raise UserError("cannot find the detection head in the ONNX graph (no '/model.N/' node names)")


def head_decode_nodes(model: onnx.ModelProto, patterns: list[str]) -> list[str]:
    """Nodes to keep float. Pattern 'detect-decode' means every node of the Detect head outside its conv
    branches (cv2/cv3): DFL, reshapes, concats, sigmoid, anchor arithmetic. 'detect-output-convs' adds each
    branch's last conv. Anything else is a regex on node names."""
    names = [n.name for n in model.graph.node]
    out = set()
    pre = detect_prefix(model)
    for p in patterns:
        if p == "detect-decode":
            out |= {n for n in names if n.startswith(pre) and not re.match(re.escape(pre) + r"(one2one_)?cv[23]\.", n)}
        elif p == "detect-output-convs":
            out |= {n for n in names if re.match(re.escape(pre) + r"(one2one_)?cv[23]\.\d+/cv[23]\.\d+\.2/", n)}
        else:
            rx = re.compile(p)
            out |= {n for n in names if rx.search(n)}
    return sorted(out)


def trunk(model: onnx.ModelProto, decode: list[str], dest: Path) -> Path:
    """The model up to (not including) the float head decode: what calibration needs to see. The decode's
    constant-offset tensors break ORT's histogram calibrators, and their ranges are never used."""
    dec = set(decode)
    producer = {o: n.name for n in model.graph.node for o in n.output}
    outs = sorted({i for n in model.graph.node if n.name in dec for i in n.input
                   if i in producer and producer[i] not in dec})
    onnx.save(model, str(dest.with_suffix(".full.onnx")))
    onnx.utils.extract_model(str(dest.with_suffix(".full.onnx")), str(dest), [model.graph.input[0].name], outs,
                             check_model=False)
    return dest


def _session_with_outputs(model: onnx.ModelProto, tensors: list[str]):
    """An ONNX Runtime CPU session of `model` that also returns the intermediate `tensors`."""
    import onnxruntime as ort

    have = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in have:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _kl_threshold(hist: np.ndarray, edges: np.ndarray, n_quant: int = 128, stride: int = 8) -> float:
    """TensorRT's entropy calibration: the clipping threshold whose 128-level quantization of the |x|
    histogram has the smallest KL divergence from the clipped reference distribution."""
    hist = hist.astype(np.float64)
    best, best_i = np.inf, len(hist)
    for i in range(n_quant, len(hist) + 1, stride):
        ref = hist[:i].copy()
        ref[-1] += hist[i:].sum()
        if ref.sum() == 0:
            continue
        bounds = np.linspace(0, i, n_quant + 1).astype(np.int64)
        starts, lens = bounds[:-1], np.diff(bounds)
        h = hist[:i]
        nz = (h > 0).astype(np.float64)
        sums = np.add.reduceat(h, starts)
        cnts = np.add.reduceat(nz, starts)
        per = np.divide(sums, cnts, out=np.zeros_like(sums), where=cnts > 0)
        q = np.repeat(per, lens) * nz
        p_ = ref / ref.sum()
        m = p_ > 0
        if q.sum() == 0 or np.any(q[m] == 0):
            continue
        q_ = q / q.sum()
        kl = float(np.sum(p_[m] * np.log(p_[m] / q_[m])))
        if kl < best:
            best, best_i = kl, i
    return float(edges[best_i])


def compute_ranges(fp32: Path, calib: np.ndarray, method: str, cache: Path, workdir: Path,
                   decode: list[str] | None = None, percentile: float = 99.99) -> Path:
    """Calibrate `fp32` on `calib` with `method` (the head decode cut off); write ORT's calibration cache.

    minmax is ORT's own calibrator. entropy and percentile are computed here from 2048-bin |x| histograms
    in float64 (ORT's histogram calibrators fail on near-constant tensors: "Too many bins for data range", and
    its entropy search takes minutes): percentile clips at that percentile of |x|, entropy at the KL-optimal
    threshold as TensorRT computes it."""

    _, c = _ort_q()
    if method not in METHODS:
        raise UserError(f"unknown calibration method '{method}' (one of {', '.join(METHODS)})")
    model = onnx.load(str(fp32))
    name = model.graph.input[0].name
    src = trunk(model, decode, workdir / "trunk.onnx") if decode else fp32
    cal = c.create_calibrator(str(src), op_types_to_calibrate=list(OP_TYPES),
                              augmented_model_path=str(workdir / "aug.onnx"),
                              calibrate_method=c.CalibrationMethod.MinMax,
                              extra_options={"symmetric": True})
    cal.collect_data(TensorReader(name, calib))
    ranges = cal.compute_data()
    if method == "minmax":
        c.save_tensors_data(ranges, cache)
        return cache
    tensors = sorted(ranges.data)
    maxabs = {t: float(max(abs(ranges.data[t].lowest.item()), abs(ranges.data[t].highest.item()))) for t in tensors}
    sess = _session_with_outputs(onnx.load(str(src)), tensors)
    bins = 2048
    hists = {t: np.zeros(bins, np.float64) for t in tensors}
    for x in calib:
        outs = sess.run(tensors, {name: x[None]})
        for t, v in zip(tensors, outs):
            hi = maxabs[t] if maxabs[t] > 0 else 1.0
            hists[t] += np.histogram(np.abs(v.astype(np.float64)), bins=bins, range=(0.0, hi))[0]
    data = {}
    for t in tensors:
        hi = maxabs[t] if maxabs[t] > 0 else 1.0
        edges = np.linspace(0.0, hi, bins + 1)
        if method == "percentile":
            cdf = np.cumsum(hists[t]) / max(hists[t].sum(), 1)
            thr = float(edges[min(int(np.searchsorted(cdf, percentile / 100.0)) + 1, bins)])
        else:
            thr = _kl_threshold(hists[t], edges)
        thr = max(thr, 1e-8)
        data[t] = c.TensorData(lowest=np.array(-thr, np.float32), highest=np.array(thr, np.float32))
    kind = c.CalibrationMethod.Percentile if method == "percentile" else c.CalibrationMethod.Entropy
    c.save_tensors_data(c.TensorsData(kind, data), cache)
    return cache


def quantize(fp32: Path, dest: Path, cache: Path, method: str, exclude: list[str],
             op_types: tuple[str, ...] = OP_TYPES) -> Path:
    q, c = _ort_q()
    kind = {"minmax": c.CalibrationMethod.MinMax, "entropy": c.CalibrationMethod.Entropy,
            "percentile": c.CalibrationMethod.Percentile}[method]
    q.quantize_static(
        str(fp32), str(dest), calibration_data_reader=None, quant_format=q.QuantFormat.QDQ,
        op_types_to_quantize=list(op_types), per_channel=True, reduce_range=False,
        activation_type=q.QuantType.QInt8, weight_type=q.QuantType.QInt8, nodes_to_exclude=list(exclude),
        calibrate_method=kind, calibration_cache_path=str(cache),
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                       # Q/DQ on inputs, as TensorRT places them; no Q/DQ on outputs, so the box and class logits
                       # enter the float decode unquantized
                       "OpTypesToExcludeOutputQuantization": list(op_types),
                       # one Q/DQ pair per consumer: a node returned to float then really reads float
                       "DedicatedQDQPair": True})
    _float_inputs(dest, list(exclude))
    return dest


def _float_inputs(path: Path, nodes: list[str]) -> None:
    """Make excluded nodes read float: ORT may still wire an excluded consumer to the Q/DQ pair of a tensor it
    quantized for another consumer. Re-point such inputs at the float tensor and drop Q/DQ left unused."""
    m = onnx.load(str(path))
    prod = {o: n for n in m.graph.node for o in n.output}
    want = set(nodes)
    changed = False
    for n in m.graph.node:
        if n.name not in want:
            continue
        for k, i in enumerate(n.input):
            dq = prod.get(i)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            q = prod.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                n.input[k] = q.input[0]
                changed = True
    if not changed:
        return
    outputs = {o.name for o in m.graph.output}
    while True:
        used = {i for n in m.graph.node for i in n.input} | outputs
        dead = [n for n in m.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")
                and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            m.graph.node.remove(n)
    used = {i for n in m.graph.node for i in n.input}
    for t in [t for t in m.graph.initializer if t.name not in used]:
        m.graph.initializer.remove(t)
    onnx.save(m, str(path))


def quantized_nodes(model: onnx.ModelProto, op_types: tuple[str, ...] = OP_TYPES) -> list[str]:
    """Nodes of `op_types` that consume a DequantizeLinear output (i.e. run quantized)."""
    dq_out = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in model.graph.node if n.op_type in op_types and any(i in dq_out for i in n.input)]


def layer_errors(fp32: Path, qdq: Path, calib: np.ndarray, names: list[str], n_images: int = 8) -> dict[str, float]:
    """Sensitivity: for each quantized node, the mean squared error its output has in the Q/DQ model vs FP32 on
    calibration images, minus the largest error among its inputs' producers (the error the node itself adds).
    Absolute, not relative: activations after BatchNorm are of comparable scale across the network, and a
    relative error would rank first the near-silent branches whose errors never reach a detection."""

    mf = onnx.load(str(fp32))
    node_out = {n.name: n.output[0] for n in mf.graph.node}
    outs = [node_out[n] for n in names if n in node_out]
    sf = _session_with_outputs(mf, outs)
    sq = _session_with_outputs(onnx.load(str(qdq)), outs)
    inp = mf.graph.input[0].name
    err = {t: 0.0 for t in outs}
    for x in calib[:n_images]:
        a = sf.run(outs, {inp: x[None]})
        b = sq.run(outs, {inp: x[None]})
        for t, u, v in zip(outs, a, b):
            err[t] += float(np.mean((u - v) ** 2)) / n_images
    producer = {o: n.name for n in mf.graph.node for o in n.output}
    by_node = {}
    for n in mf.graph.node:
        if n.name in names and n.output[0] in err:
            upstream = [err.get(i, 0.0) for i in n.input if producer.get(i) in names]
            by_node[n.name] = err[n.output[0]] - (max(upstream) if upstream else 0.0)
    return by_node


def output_error(ref: list[np.ndarray], qdq: Path, calib: np.ndarray) -> float:
    """Score-weighted error of a Q/DQ model's detector output vs FP32 reference outputs `ref` (one per
    calibration image): box errors (in input pixels, over imgsz²) plus class-score errors, per anchor, weighted by
    the anchor's FP32 best class score, so anchors that never become detections do not count."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    s = ort.InferenceSession(str(qdq), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    size = float(calib.shape[-1]) ** 2
    tot = 0.0
    for x, f in zip(calib, ref):
        q = s.run(None, {name: x[None]})[0][0]
        f = f[0]
        w = f[4:].max(0)
        w = np.where(w > 0.01, w, 0.0)  # anchors that can become detections
        e = ((q[:4] - f[:4]) ** 2).sum(0) / size + ((q[4:] - f[4:]) ** 2).sum(0)
        tot += float((w * e).sum() / (w.sum() + 1e-12))
    return tot / len(calib)


def reference_outputs(fp32: Path, calib: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    s = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return [s.run(None, {name: x[None]})[0] for x in calib]
