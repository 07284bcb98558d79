"""The supported model families, by their recipe name (pipeline/adapters/family.py says what a family answers)."""

from __future__ import annotations

from pipeline.adapters.families.yolo11 import YOLO11
from pipeline.adapters.families.yolo26 import YOLO26
from pipeline.adapters.families.yolov8 import YOLOv8

FAMILIES = {f.name: f for f in (YOLOv8(), YOLO11(), YOLO26())}
