"""Knowledge distillation on the Detect head's outputs and channel-wise on the neck: the losses themselves, and a
distilled fine-tune through the stock trainer that keeps the pruned architecture and really trains on the KD term."""

import csv
import math

import pytest
import torch

from pipeline.adapters import pruning as yp
from pipeline.adapters import ultralytics_yolo as ua
from pipeline.adapters.distill import channel_kd_loss, head_kd_loss
from pipeline.adapters.family import family_named

F11 = family_named("yolo11")


def _head(b=2, nc=8, reg_max=16, a=210, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return {"scores": torch.randn(b, nc, a, generator=g) * scale, "boxes": torch.randn(b, 4 * reg_max, a, generator=g)}


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_head_kd_is_zero_for_equal_heads_positive_otherwise_and_pulls_the_student(temperature):
    t = _head(seed=0)
    assert abs(float(head_kd_loss(t, t, 16, temperature))) < 1e-5
    s = {k: v.clone().requires_grad_(True) for k, v in _head(seed=1).items()}
    first = float(head_kd_loss(s, t, 16, temperature).detach())
    assert first > 0.1
    opt = torch.optim.Adam(s.values(), lr=0.1)
    for _ in range(50):
        opt.zero_grad()
        loss = head_kd_loss(s, t, 16, temperature)
        loss.backward()
        opt.step()
    assert float(head_kd_loss(s, t, 16, temperature).detach()) < 0.2 * first
    assert t["scores"].grad is None  # the teacher is never trained


def test_head_kd_weights_anchors_by_teacher_confidence():
    t = _head(seed=0)
    t["scores"][:] = -12.0  # the teacher sees nothing anywhere ...
    t["scores"][:, 3, :5] = 8.0  # ... but an object at five anchors
    s = {k: v.clone() for k, v in t.items()}
    s["boxes"][..., 100:] += 5 * torch.randn_like(s["boxes"][..., 100:])  # boxes wrong where the teacher sees nothing
    quiet = float(head_kd_loss(s, t, 16))
    s2 = {k: v.clone() for k, v in t.items()}
    s2["boxes"][..., :5] += 5 * torch.randn_like(s2["boxes"][..., :5])  # boxes wrong on the object
    loud = float(head_kd_loss(s2, t, 16))
    assert loud > 20 * quiet


def test_channel_kd_by_hand_and_its_invariances():
    """One image, one channel, two positions: the teacher's spatial softmax (1/4, 3/4) against the student's (1/2, 1/2)
    is KL = 1/4 ln(1/2) + 3/4 ln(3/2); a constant added to a channel changes nothing (a softmax over positions); the
    temperature scales by T^2."""
    t = torch.tensor([0.0, math.log(3.0)]).view(1, 1, 1, 2)
    s = torch.zeros(1, 1, 1, 2)
    want = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    assert float(channel_kd_loss(s, t)) == pytest.approx(want, rel=1e-6)
    assert float(channel_kd_loss(s + 7.0, t - 2.0)) == pytest.approx(want, rel=1e-6)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 8, 5, 6, generator=g), torch.randn(2, 8, 5, 6, generator=g)
    assert abs(float(channel_kd_loss(a, a))) < 1e-6 and float(channel_kd_loss(b, a)) > 0.1
    per_channel = [float(channel_kd_loss(b[i:i + 1, c:c + 1], a[i:i + 1, c:c + 1])) for i in range(2) for c in range(8)]
    assert float(channel_kd_loss(b, a)) == pytest.approx(sum(per_channel) / 16, rel=1e-5)
    assert float(channel_kd_loss(b * 2, a * 2, temperature=2.0)) == pytest.approx(4 * float(channel_kd_loss(b, a)),
                                                                                  rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("head_kd", [{"head_weight": 1.0, "temperature": 1.0},
                                     {"head_weight": 0.0, "channel_weight": 1.0, "channel_temperature": 1.0}],
                         ids=["head", "channel-wise"])
def test_distilled_finetune_trains_on_the_kd_loss_and_keeps_the_architecture(synth_small, tmp_path, head_kd):
    from pipeline.data.formats import load_dataset, write_yolo

    ds = load_dataset(synth_small)
    y = write_yolo(ds, tmp_path / "y")
    torch.manual_seed(0)
    teacher = ua.build_from_yaml("yolo11n.yaml", nc=8, names=ds.names)
    ua.save_checkpoint(teacher, tmp_path / "teacher.pt")
    p, _, info = yp.prune(teacher, 256, yp.PruneSpec(ratio=0.3), F11)
    ua.save_checkpoint(p, tmp_path / "p.pt")
    last = ua.finetune(tmp_path / "p.pt", y, tmp_path / "ft",
                       ua.TrainOptions(1, 256, {"batch": 8, "workers": 0},
                                       distill=ua.Distill(tmp_path / "teacher.pt", 0.0, head_kd)))
    out = ua.load_detection_model(last)  # the student, not the distillation wrapper
    assert yp.arch_signature(out) == yp.arch_signature(p)
    assert sum(t.numel() for t in out.parameters()) == info["params"]
    ck = torch.load(last, weights_only=False)
    assert type(ck["model"]).__name__ == "DetectionModel"  # ultralytics unwraps the student when it finishes
    with open(tmp_path / "ft" / "results.csv") as f:
        row = {k.strip(): v for k, v in next(csv.DictReader(f)).items()}
    assert float(row["train/kd_loss"]) > 0, row  # with head_weight 0, the channel-wise term alone
