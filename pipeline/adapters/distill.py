"""Knowledge distillation on the Detect head's outputs, from the unpruned model to the pruned one.

Ultralytics 8.4 ships feature distillation (`DistillationModel`, switched on by the trainer argument
`distill_model`): a frozen teacher, forward hooks on the neck levels and on Detect, a projector, and a
score-weighted L2 on neck features (weight `dis`). A pruned student has the teacher's exact head outputs (same
anchors, classes and DFL bins), so the most direct signal is the outputs themselves. `HeadDistillationModel`
is ultralytics' own wrapper with one term added to its loss:

- classification: the Bernoulli KL divergence between the teacher's and the student's per-class sigmoid
  scores at every anchor (BCE with the teacher's probabilities as soft targets, minus the teacher's own
  entropy, so the term is 0 when the student matches);
- box: the KL divergence between the teacher's and the student's DFL distributions (4 sides x reg_max bins); for a
  head without DFL (YOLO26) the smooth-L1 distance between their regressed side distances;

both at temperature T (scaled by T^2), weighted per anchor by the teacher's best class score (background
anchors, which the teacher is sure are empty, carry little) and normalised by the sum of those weights,
as ultralytics' detection loss normalises by its target-score sum. A head with a one-to-one branch beside its
one-to-many one (YOLO26) has both distilled, each at half the weight.

Optionally (`channel_weight`), channel-wise distillation on the neck levels that feed Detect (Shu et al., "Channel-wise
Knowledge Distillation for Dense Prediction", ICCV 2021): each channel's activations become a distribution over
the feature map's positions (a softmax at temperature `channel_temperature`), and the student's, lifted to the
teacher's width by ultralytics' projector (1x1 conv, ReLU, 1x1 conv, trained with the student), follow the
teacher's by KL divergence, averaged over channels and images and scaled by T^2. It joins the head term in
`kd_loss`.

It enters training through the stock trainer's public hook `set_model_attributes` (see
ultralytics_yolo.KeepArchitectureTrainer); checkpoint, EMA (teacher stripped) and resume handling are
ultralytics' own, since this is a DistillationModel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ultralytics.nn.distill_model import DistillationModel


def head_kd_loss(student: dict, teacher: dict, reg_max: int, temperature: float = 1.0) -> torch.Tensor:
    """Score-weighted KL divergence between two Detect heads' raw outputs ({"boxes": (B, 4*reg_max, A),
    "scores": (B, nc, A)}). 0 when they are equal. Without DFL bins (reg_max 1: YOLO26's head regresses the four
    side distances directly) the box term is the smooth-L1 distance between the two heads' distances (grid cells,
    summed over the sides), at the same weights, not scaled by the temperature."""
    t = float(temperature)
    ts, ss = teacher["scores"].detach().float() / t, student["scores"].float() / t
    pt = ts.sigmoid()
    cls_kl = (F.binary_cross_entropy_with_logits(ss, pt, reduction="none")
              - F.binary_cross_entropy_with_logits(ts, pt, reduction="none"))  # (B, nc, A)
    w = pt.max(1).values  # (B, A): how sure the teacher is that an object is there
    norm = w.sum().clamp(min=1.0)
    b, _, a = teacher["boxes"].shape
    if reg_max == 1:
        box = F.smooth_l1_loss(student["boxes"].float(), teacher["boxes"].detach().float(), reduction="none").sum(1)
        return ((cls_kl.sum(1) * w).sum() * t * t + (box * w).sum()) / norm
    tl = (teacher["boxes"].detach().float() / t).view(b, 4, reg_max, a).log_softmax(2)
    sl = (student["boxes"].float() / t).view(b, 4, reg_max, a).log_softmax(2)
    box_kl = (tl.exp() * (tl - sl)).sum(2).mean(1)  # (B, A)
    return (cls_kl.sum(1) * w + box_kl * w).sum() / norm * t * t


def channel_kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Channel-wise distillation between two (N, C, H, W) feature maps of one shape: per image and channel, the KL
    divergence from the teacher's spatial softmax to the student's, averaged over images and channels, times T^2.
    0 when they are equal."""
    n, c = teacher.shape[:2]
    t = float(temperature)
    tl = (teacher.detach().float() / t).reshape(n * c, -1).log_softmax(1)
    sl = (student.float() / t).reshape(n * c, -1).log_softmax(1)
    return (tl.exp() * (tl - sl)).sum(1).mean() * t * t


class HeadDistillationModel(DistillationModel):
    """ultralytics' DistillationModel plus a KD loss on the Detect head's outputs (`head_weight`) and, optionally,
    channel-wise distillation on the neck levels (`channel_weight`); its own feature loss keeps its weight `dis` (a
    trainer argument; 0 switches it off)."""

    def __init__(self, teacher_model, student_model, head_weight: float = 1.0, temperature: float = 1.0,
                 channel_weight: float = 0.0, channel_temperature: float = 1.0):
        super().__init__(teacher_model=teacher_model, student_model=student_model)
        self.head_weight = float(head_weight)
        self.temperature = float(temperature)
        self.channel_weight = float(channel_weight)
        self.channel_temperature = float(channel_temperature)

    def loss(self, batch, preds=None):
        loss, items = super().loss(batch, preds)  # detection loss + ultralytics' feature loss; fills the hooks
        kd = torch.zeros(1, device=loss.device)
        if self.training and self.head_weight > 0:
            n = len(self.feats_idx) - 1  # the Detect level
            head = self._teacher_feats[n]
            # an end-to-end head (YOLO26) has two branches: both are distilled (the one-to-one is the deployed one)
            branches = ("one2many", "one2one") if isinstance(head, dict) and "one2one" in head else ("one2many",)
            reg_max = self.student_model.model[-1].reg_max
            for b in branches:
                teacher = self.decouple_outputs(head, branch=b)
                student = self.decouple_outputs(self._student_feats[n], branch=b)
                kd = kd + head_kd_loss(student, teacher, reg_max, self.temperature).reshape(1) * (
                    self.head_weight / len(branches))
        if self.training and getattr(self, "channel_weight", 0.0) > 0:  # checkpoints pickled before it lack it
            for i in range(len(self.feats_idx) - 1):  # the neck levels
                teacher = self.decouple_outputs(self._teacher_feats[i])
                student = self.projector[i](self.decouple_outputs(self._student_feats[i]))
                kd = kd + channel_kd_loss(student, teacher, self.channel_temperature) * self.channel_weight
        items["kd_loss"] = kd.detach()
        return torch.cat([loss, kd * batch["img"].shape[0]]), items
