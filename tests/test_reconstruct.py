"""Layer-wise feature reconstruction after pruning (pipeline/adapters/reconstruct.py), on the shipped
base model and the default recipe's own val images."""

import copy

import numpy as np
import pytest
import torch
from conftest import BASE_CKPT

from pipeline.adapters import pruning as yp
from pipeline.adapters import ultralytics_yolo as ua
from pipeline.adapters.family import family_named
from pipeline.adapters.reconstruct import conv_units, kept_channels, reconstruct

IMGSZ = 320

F11 = family_named("yolo11")


def _tensor(images):
    import cv2

    from pipeline.eval.detect import PrePost, letterbox

    spec = PrePost(imgsz=IMGSZ)
    return torch.from_numpy(np.concatenate([letterbox(cv2.imread(str(im.path)), spec)[0] for im in images]))


@pytest.fixture(scope="module")
def pruned_half():
    if not BASE_CKPT.is_file():
        pytest.skip(f"{BASE_CKPT} is absent: `make base` makes it")
    base = ua.load_detection_model(BASE_CKPT)
    pruned, history, info = yp.prune(base, IMGSZ, yp.PruneSpec(macs_target=0.5), F11, log=lambda s: None)
    return base, pruned, history


@pytest.mark.slow
def test_kept_channels_are_exactly_the_ones_torch_pruning_kept(pruned_half):
    base, pruned, history = pruned_half
    ref = yp.prepare(base, F11)
    kept = kept_channels(ref, history, IMGSZ, F11)
    ref_units = {n: (c, b) for n, c, b in conv_units(ref)}
    checked = 0
    for name, conv, bn in conv_units(pruned):
        rc, rb = ref_units[name]
        assert len(kept[name]) == conv.out_channels, name
        assert torch.all(kept[name][1:] > kept[name][:-1]), name  # in order, no repeats
        if bn is not None:
            for a, b in ((bn.weight, rb.weight), (bn.bias, rb.bias), (bn.running_var, rb.running_var)):
                assert torch.equal(a, b[kept[name]]), name
            checked += rc.out_channels != conv.out_channels
    assert checked >= 30  # most convs lost channels


@pytest.mark.slow
def test_reconstruction_brings_the_pruned_model_back_toward_the_base(pruned_half, val_synth):
    from pipeline.adapters.prune_plan import Evaluator
    from pipeline.data.formats import load_dataset
    from pipeline.eval.detect import PrePost

    base, pruned, history = pruned_half
    ds = load_dataset(val_synth)
    imgs = ds.split("val")
    calib, held = _tensor(imgs[:24]), imgs[24:]
    ref = yp.prepare(base, F11).eval()
    ev = Evaluator(held, ds, PrePost(imgsz=IMGSZ), F11)
    x = _tensor(held)

    def head_error(m):
        with torch.no_grad():
            a, b = m.eval()(x)[0], ref(x)[0]
        return (((a[:, :4] - b[:, :4]) / IMGSZ) ** 2).mean().item(), ((a[:, 4:] - b[:, 4:]) ** 2).mean().item()

    model = copy.deepcopy(pruned)
    sig = yp.arch_signature(model)
    box0, cls0 = head_error(model)
    map0 = ev(model)
    stats = reconstruct(ref, model, history, calib, IMGSZ, F11, positions=128)
    box1, cls1 = head_error(model)
    map1 = ev(model)
    print(f"held-out head MSE boxes {box0:.3g} -> {box1:.3g}, scores {cls0:.5g} -> {cls1:.5g}; "
          f"mAP50-95 {map0:.4f} -> {map1:.4f}; {len(stats['layers'])} convs in {stats['seconds']:.0f}s")
    assert yp.arch_signature(model) == sig  # weights refit, architecture untouched
    assert len(stats["layers"]) >= 80 and all(s["why"] in ("grouped", "DFL (fixed)") for s in stats["skipped"])
    assert all(layer["mse_after"] <= layer["mse_before"] * (1 + 1e-9) for layer in stats["layers"])
    assert stats["mse_after"] < 0.7 * stats["mse_before"]
    # on images it was not fit on: the box error falls sharply; the class-score error barely moves on the converged
    # base (0.0016148 -> 0.0016101 here), so it is held to 'no worse' within 2% rather than to a strict fall
    assert box1 < 0.5 * box0 and cls1 <= 1.02 * cls0
    assert map1 > map0 + 0.1
    # BN carries the refit convs' own statistics: finite, positive variances
    for _, _, bn in conv_units(model):
        if bn is not None:
            assert torch.isfinite(bn.running_mean).all() and (bn.running_var > 0).all()


@pytest.mark.slow
def test_stepped_forward_refits_exactly_as_the_whole_model_forward(pruned_half, val_synth):
    """The reconstruction re-runs only the top-level layer that holds the conv being refit (the others' outputs are
    kept per batch); forcing the whole-model forward per conv gives bit-identical weights."""
    from pipeline.data.formats import load_dataset

    base, pruned, history = pruned_half
    calib = _tensor(load_dataset(val_synth).split("val")[:4])
    a, b = copy.deepcopy(pruned), copy.deepcopy(pruned)
    ref = yp.prepare(base, F11).eval()
    sa = reconstruct(ref, a, history, calib, IMGSZ, F11, positions=64, batch=3)  # 2 batches: 3 + 1
    sb = reconstruct(ref, b, history, calib, IMGSZ, F11, positions=64, batch=3, stepped=False)
    assert sa["stepped"] and not sb["stepped"] and len(sa["layers"]) == len(sb["layers"]) >= 80
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
