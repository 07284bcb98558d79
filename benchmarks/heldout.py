"""Score a run's base and pruned models on a held-out synthetic split the pipeline never saw.

The default run's val split is scored by bench and watched during training (never used to pick a checkpoint: the
last epoch's weights ship), so a recipe tuned run after run against it could still fit it. This generates a fresh
split with another seed (same generator and settings otherwise), scores base-fp32 (the load stage's checkpoint)
and pruned-fp32 (the fine-tune stage's) with ultralytics' own validator, side by side, and writes
<run>/heldout.json.

    .venv/bin/python benchmarks/heldout.py [--run runs/default] [--seed 7] [--images 600]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, default=ROOT / "runs" / "default")
    ap.add_argument("--seed", type=int, default=7, help="generator seed of the held-out split (the default run: 0)")
    ap.add_argument("--images", type=int, default=600)
    a = ap.parse_args()

    models = {"base-fp32": a.run / "load" / "model.pt", "pruned-fp32": a.run / "finetune" / "model.pt"}
    for name, p in models.items():
        if not p.is_file():
            print(f"error: {p}: no {name} checkpoint (run `make pipeline` first)", file=sys.stderr)
            return 2
    spec_run = json.loads((a.run / "data" / "synthetic" / "dataset.json").read_text())["spec"]
    if spec_run["seed"] == a.seed:
        print(f"error: --seed {a.seed} is the run's own data seed: not held out", file=sys.stderr)
        return 2
    # the arguments hold: now the heavy imports (torch, ultralytics), offline
    from pipeline.adapters.offline import setup_offline

    setup_offline()
    from pipeline.adapters import ultralytics_yolo as ua
    from pipeline.data.formats import load_dataset, write_yolo
    from pipeline.data.synthetic import SynthSpec, generate
    spec = SynthSpec(**{**{k: v for k, v in spec_run.items() if k != "version"}, "seed": a.seed, "train": 1,
                        "val": a.images})
    imgsz = json.loads((a.run / "load" / "record.json").read_text())["config"]["model"]["imgsz"]  # the run's own
    with tempfile.TemporaryDirectory(prefix="yolo-edge-heldout-") as td:
        coco = generate(Path(td) / "coco", spec)
        data_yaml = write_yolo(load_dataset(coco), Path(td) / "yolo")
        scores = {name: ua.val(p, data_yaml, imgsz, batch=16) for name, p in models.items()}
    d = scores["pruned-fp32"]["map50_95"] - scores["base-fp32"]["map50_95"]
    out = {"split": {**spec.as_dict(), "note": "val split of this spec; the run's data used seed "
                     f"{spec_run['seed']}"}, "scores": scores, "delta_map50_95_pt": round(100 * d, 2),
           "evaluator": "ultralytics val (conf 0.001, iou 0.7, max_det 300)"}
    (a.run / "heldout.json").write_text(json.dumps(out, indent=1))
    for name, s in scores.items():
        print(f"{name:12s} mAP50-95 {s['map50_95']:.4f}  mAP50 {s['map50']:.4f}")
    print(f"pruned-fp32 vs base-fp32 on {a.images} held-out images (seed {a.seed}): {100 * d:+.2f} pt mAP50-95")
    return 0


if __name__ == "__main__":
    sys.exit(main())
