"""yolo-edge: prune, fine-tune, quantize and benchmark YOLO11 detectors for NVIDIA Jetson."""

__version__ = "0.1.0"
