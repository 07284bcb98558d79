"""Contract tests of the ultralytics adapter on a tiny random YOLO11: they say when an ultralytics upgrade breaks
what the pipeline relies on."""

import time

import numpy as np
import onnx
import pytest
import torch

from pipeline.adapters import ultralytics_yolo as ua
from pipeline.adapters.family import family_named
from pipeline.core.errors import UserError

F11 = family_named("yolo11")


@pytest.mark.slow
@pytest.mark.parametrize("nc", [3, 80])
def test_yaml_any_class_count_saves_fp32_and_reloads_with_plain_yolo(tmp_path, nc):
    from ultralytics import YOLO

    m = ua.build_from_yaml("yolo11n.yaml", nc=nc, names=[f"k{i}" for i in range(nc)])
    assert m.model[-1].nc == nc
    p = ua.save_checkpoint(m, tmp_path / "m.pt")
    ck = torch.load(p, weights_only=False)
    assert all(t.dtype == torch.float32 for t in ck["model"].state_dict().values() if t.is_floating_point())
    x = torch.rand(1, 3, 160, 160)
    y1 = ua.torch_forward(m, x)
    y2 = ua.torch_forward(YOLO(str(p)).model, x)
    assert np.array_equal(y1, y2)
    assert ua.names_of(ua.load_detection_model(p)) == [f"k{i}" for i in range(nc)]


def test_stats_count_params_and_macs():
    m = ua.build_from_yaml("yolo11n.yaml", nc=80)
    s = ua.model_stats(m, 640, F11)
    assert 2.5e6 < s["params"] < 2.7e6  # YOLO11n: 2.6 M parameters
    assert 2.9e9 < s["macs"] < 3.5e9  # and 6.5 GFLOPs = ~3.2 GMACs at 640


def test_unknown_yaml_is_a_user_error():
    with pytest.raises(UserError, match="architecture yaml not found"):
        ua.build_from_yaml("yolo99q.yaml", nc=3)


@pytest.mark.slow
def test_export_static_onnx_matches_torch(tmp_path):
    from pipeline.data.synthetic import SynthSpec, generate
    from pipeline.stages.export import export_checked

    ds = generate(tmp_path / "d", SynthSpec(train=1, val=2))
    m = ua.build_from_yaml("yolo11n.yaml", nc=8)
    ck = ua.save_checkpoint(m, tmp_path / "m.pt")
    info = export_checked(ck, tmp_path / "m.onnx", 256, 17, True, sorted((ds / "images/val").glob("*.jpg")), 1e-3, F11)
    assert info["opset"] == 17 and info["checker"] == "passed"
    assert info["inputs"] == [[1, 3, 256, 256]]
    assert info["parity_max_abs_diff"] <= 1e-3
    onnx.checker.check_model(onnx.load(str(tmp_path / "m.onnx")))


def test_download_attempt_fails_fast_and_loudly(tmp_path, monkeypatch):
    from ultralytics.utils.downloads import attempt_download_asset

    monkeypatch.chdir(tmp_path)
    t = time.time()
    with pytest.raises(Exception) as e:
        attempt_download_asset("yolo11s.pt", retry=1)
    assert time.time() - t < 30
    assert not (tmp_path / "yolo11s.pt").exists()
    assert str(e.value)


def test_training_history_keeps_the_rerun_of_an_epoch_whose_checkpoint_was_lost(tmp_path):
    """Killed after an epoch's results.csv row but before its last.pt: the resumed run trains that epoch again and
    appends a second row; the history keeps one row per epoch, the later one."""
    head = "epoch,train/box_loss,metrics/mAP50(B),metrics/mAP50-95(B)\n"
    (tmp_path / "results.csv").write_text(head + "1,1.5,0.5,0.30\n2,1.4,0.6,0.35\n2,1.3,0.62,0.36\n3,1.2,0.7,0.40\n")
    h = ua.training_history(tmp_path)
    assert [r["epoch"] for r in h] == [1, 2, 3]
    assert h[1]["map50_95"] == 0.36 and h[1]["train_loss"] == {"box_loss": 1.3}


@pytest.mark.slow
def test_train_cut_off_resumes_from_its_last_epoch_and_a_finished_run_is_kept(tmp_path):
    """What `make base` relies on across sessions: a stock training cut off once epoch 1's last.pt is on disk goes
    on from epoch 2 in the same folder (not from scratch), and calling it again once finished trains nothing."""
    from ultralytics.utils import callbacks

    from pipeline.data.formats import load_dataset, write_yolo
    from pipeline.data.synthetic import SynthSpec, generate

    y = write_yolo(load_dataset(generate(tmp_path / "ds", SynthSpec(seed=7, train=8, val=4))), tmp_path / "y")
    out = tmp_path / "phase1"

    class Cut(Exception):
        pass

    def cut(trainer):
        if trainer.epoch == 0:
            raise Cut

    args = dict(epochs=2, imgsz=64, batch=4, workers=0)
    callbacks.default_callbacks["on_model_save"].append(cut)
    try:
        with pytest.raises(Cut):
            ua.train("yolo11n.yaml", y, out, **args)
    finally:
        callbacks.default_callbacks["on_model_save"].remove(cut)
    assert [r["epoch"] for r in ua.training_history(out)] == [1]
    assert not (out / "weights" / "done").exists()
    first = ua.training_history(out)[0]
    best = ua.train("yolo11n.yaml", y, out, **args)
    h = ua.training_history(out)
    assert [r["epoch"] for r in h] == [1, 2] and h[0] == first  # epoch 1 kept, not trained again
    assert (out / "weights" / "done").exists() and best.is_file()
    stamp = (out / "weights" / "last.pt").stat().st_mtime_ns
    assert ua.train("yolo11n.yaml", y, out, **args) == best
    assert (out / "weights" / "last.pt").stat().st_mtime_ns == stamp
    (out / "weights" / "done").unlink()  # cut off after ultralytics finished but before the marker: still finished
    assert ua.train("yolo11n.yaml", y, out, **args) == best
    assert (out / "weights" / "last.pt").stat().st_mtime_ns == stamp and (out / "weights" / "done").exists()
