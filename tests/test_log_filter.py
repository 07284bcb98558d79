"""The lines ultralytics logs once per parameter (frozen-layer notices on a resume, "Freezing
layer" for a distillation's teacher) come out as one summary line each."""

import logging
import re

import pytest

from pipeline.adapters.log_filter import CollapseRepeats, collapsed_repeats


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):  # ultralytics' own handler (first) has put its "WARNING ⚠️ " into record.msg
        self.lines.append((record.levelno, re.sub(r"^WARNING( ⚠️)? ", "", record.getMessage())))


@pytest.fixture
def ultra_lines():
    from ultralytics.utils import LOGGER

    h = _Lines()
    LOGGER.addHandler(h)
    yield LOGGER, h.lines
    LOGGER.removeHandler(h)


def _frozen(k):
    return (f"setting 'requires_grad=True' for frozen layer '{k}'. "
            "See ultralytics.engine.trainer for customization of frozen layers.")


def test_per_parameter_notices_become_one_summary_line_in_place(ultra_lines):
    log, lines = ultra_lines
    with collapsed_repeats(log):
        log.info("before")
        for i in range(200):
            log.warning(_frozen(f"model.{i}.conv.weight"))
            if i == 150:
                log.info("Freezing layer 'model.23.dfl.conv.weight'")  # another kind, within the loop
        log.info("after")
        for i in range(3):
            log.info(f"Freezing layer 'teacher_model.model.{i}.conv.weight'")
    assert lines == [
        (logging.INFO, "before"),
        (logging.WARNING, "200 frozen-layer notices collapsed: ultralytics set requires_grad=True on all 200 "
                          "parameters (model.0.conv.weight ... model.199.conv.weight)"),
        (logging.INFO, "Freezing layer 'model.23.dfl.conv.weight'"),  # alone: let through as it was
        (logging.INFO, "after"),
        (logging.INFO, "3 freezing notices collapsed: ultralytics froze 3 parameters "
                       "(teacher_model.model.0.conv.weight ... teacher_model.model.2.conv.weight)"),  # at the end
    ]
    assert not any(isinstance(f, CollapseRepeats) for f in log.filters)  # removed after the call
    log.warning(_frozen("x"))
    log.warning(_frozen("y"))
    assert lines[-2:] == [(logging.WARNING, _frozen("x")), (logging.WARNING, _frozen("y"))]


def test_filter_is_removed_when_the_call_raises(ultra_lines):
    log, lines = ultra_lines
    with pytest.raises(RuntimeError), collapsed_repeats(log):
        log.warning(_frozen("a"))
        log.warning(_frozen("b"))
        raise RuntimeError("cut off")
    assert lines == [(logging.WARNING, "2 frozen-layer notices collapsed: ultralytics set requires_grad=True on all "
                                       "2 parameters (a ... b)")]
    assert not any(isinstance(f, CollapseRepeats) for f in log.filters)


@pytest.mark.slow
def test_resumed_finetune_prints_one_frozen_layer_line(tmp_path, ultra_lines):
    """A real fine-tune cut off after its first epoch (last.pt written), then resumed: ultralytics saved last.pt with
    every weight frozen and logs a notice per parameter when it resumes; one line comes out."""
    from ultralytics.utils import callbacks

    from pipeline.adapters import ultralytics_yolo as ua
    from pipeline.data.formats import load_dataset, write_yolo
    from pipeline.data.synthetic import SynthSpec, generate

    ds = load_dataset(generate(tmp_path / "ds", SynthSpec(seed=7, train=8, val=4)))
    y = write_yolo(ds, tmp_path / "y")
    ua.save_checkpoint(ua.build_from_yaml("yolo11n.yaml", nc=ds.nc, names=ds.names), tmp_path / "m.pt")

    class Cut(Exception):
        pass

    def cut(trainer):
        if trainer.epoch == 0:
            raise Cut

    callbacks.default_callbacks["on_model_save"].append(cut)  # "killed" once epoch 1's last.pt is on disk
    try:
        with pytest.raises(Cut):
            ua.finetune(tmp_path / "m.pt", y, tmp_path / "ft", ua.TrainOptions(2, 64, {"batch": 4, "workers": 0}))
    finally:
        callbacks.default_callbacks["on_model_save"].remove(cut)
    log, lines = ultra_lines
    lines.clear()
    last = ua.finetune(tmp_path / "m.pt", y, tmp_path / "ft", ua.TrainOptions(2, 64, {"batch": 4, "workers": 0}))
    msgs = [m for _, m in lines]
    assert any(m.startswith("Resuming training") for m in msgs), msgs
    assert not any("for frozen layer" in m for m in msgs), msgs
    summary = [m for m in msgs if "frozen-layer notices collapsed" in m]
    assert len(summary) == 1 and int(summary[0].split()[0]) > 100, summary  # a YOLO11n: ~250 parameters
    assert not any(isinstance(f, CollapseRepeats) for f in log.filters)
    assert ua.training_history(tmp_path / "ft")[-1]["epoch"] == 2 and last.is_file()


def test_a_resumed_tasks_eta_counts_from_where_it_went_on():
    """Plain progress lines (no terminal): a training resumed at epoch 72 of 80 that took 30 s for its next 4 epochs
    has about 30 s left, not the 2 s a count from zero would claim."""
    from pipeline.core.console import _Task, console

    t = _Task("training", 80, None, None)
    t.t0 -= 30
    t.resumed_at(72)
    with console.capture() as cap:
        t.update(76)
    line = cap.get().strip()
    assert line.startswith("training: 76/80 (") and line.endswith(" s left)"), line
    assert 25 <= int(line.split("(")[1].split()[0]) <= 35, line


def test_a_project_line_longer_than_80_columns_stays_one_line_off_a_terminal(tmp_path):
    """Off a terminal (a pipe, nohup, CI) rich assumes 80 columns; the project's lines are not wrapped there, so a log
    line reads whole (a sparsity phase's line is ~85 characters)."""
    from pipeline.core.console import captured, console

    msg = "  sparsity phase 1/3: 20 epochs, group regularization 0.0005, on the rewritten model, distilled from it"
    assert len(msg) > 80
    with console.capture() as cap:
        console.print(msg)
    assert cap.get() == msg + "\n"
    log = tmp_path / "log.txt"
    with captured(log):
        console.print(msg)
    lines = [ln for ln in log.read_text().splitlines() if "sparsity phase" in ln]
    assert len(lines) == 1 and lines[0].endswith(msg.strip()), lines
