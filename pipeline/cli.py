"""yolo-edge command line: parses, calls stages, prints. No pipeline logic lives here."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from pipeline.core.errors import UserError
from pipeline.stages.order import RECORDS, STAGES, spec

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Prune, fine-tune, quantize and benchmark YOLOv8, YOLO11 and YOLO26 for NVIDIA Jetson.")


@app.callback()
def _options(verbose: bool = typer.Option(False, "--verbose", "-v",
                                          help="stream what the libraries print (each stage's log.txt) to the "
                                               "terminal too")):
    """Each stage prints its start and result lines; what the libraries print goes to runs/<run>/<stage>/log.txt."""
    from pipeline.core.console import set_verbose

    set_verbose(verbose)

# `run` includes the engine stage: it writes the strongly typed FP16/INT8 ONNX files (bench scores them) and builds
# the TensorRT engines where TensorRT is importable; elsewhere it says so in one line and the run goes on. `make
# engine` (`yolo-edge stage engine`) asks for the build itself, and exits 2 where TensorRT is missing.
DEFAULT_RECIPE = Path("models/default.yaml")

RecipeOpt = typer.Option(DEFAULT_RECIPE, "--recipe", "-r", help="recipe yaml (models/*.yaml)")
SetOpt = typer.Option(None, "--set", help="override a recipe key: --set bench.cap_s=60 (repeatable)")
RunDirOpt = typer.Option(None, "--run-dir", help="run directory (default runs/<recipe name>)")


def packaged_default() -> Path:
    """The default recipe as the package ships it (models/default.yaml in a checkout is a link to it)."""
    return Path(__file__).resolve().parent / "recipes" / "default.yaml"


def _ctx(recipe: Path, sets: list[str] | None, run_dir: Path | None, force: bool = False):
    from pipeline.core.config import load_recipe
    from pipeline.core.stage import Context

    if recipe == DEFAULT_RECIPE and not recipe.is_file():  # outside a checkout: the package's own copy
        recipe = packaged_default()
    r = load_recipe(recipe, sets or [])
    return Context(run_dir=Path(run_dir or Path("runs") / r.name), recipe=r, recipe_path=recipe, force=force)


def _run_stages(ctx, stages: list[str], build_required: bool = False) -> None:
    """The named stages the recipe enables (the stage registry says which), each pre-flight check first (before any
    stage writes anything), then each stage in turn."""
    for s in stages:
        if s not in STAGES:
            raise UserError(f"unknown stage '{s}' (stages: {', '.join(STAGES)})")
    todo = [spec(s) for s in stages if spec(s).enabled(ctx.recipe)]
    for st in todo:
        st.check(ctx)
    from pipeline.core.store import run_lock

    with run_lock(ctx.run_dir, f"`yolo-edge {' '.join(sys.argv[1:3])}`"):  # one command per run directory
        for st in todo:
            st.run(ctx, build_required)


@app.command()
def run(recipe: Path = RecipeOpt, sets: list[str] | None = SetOpt, run_dir: Path | None = RunDirOpt,
        stages: str = typer.Option(",".join(STAGES), help="comma-separated stages, in pipeline order"),
        force: bool = typer.Option(False, "--force", help="re-run stages even when cached")):
    """Run the pipeline (or some stages of it) for a recipe; cached stages are skipped."""
    ctx = _ctx(recipe, sets, run_dir, force)
    _run_stages(ctx, [s.strip() for s in stages.split(",") if s.strip()])
    if (ctx.run_dir / "report.json").is_file() and "bench" in stages:
        _print_summary(ctx.run_dir)


def _print_summary(run_dir: Path) -> None:
    """The variant table and where the whole report is."""
    from pipeline.report.markdown import summary_table

    typer.echo(summary_table(json.loads((run_dir / "report.json").read_text())))
    typer.echo(f"report: {run_dir / 'report.md'} (and report.html, report.json); each stage's log: "
               f"{run_dir}/<stage>/log.txt")


@app.command()
def stage(name: str, recipe: Path = RecipeOpt, sets: list[str] | None = SetOpt,
          run_dir: Path | None = RunDirOpt, force: bool = typer.Option(False, "--force")):
    """Run one stage; the stages before it must have run."""
    _run_stages(_ctx(recipe, sets, run_dir, force), [name], build_required=name == "engine")


@app.command()
def bench(data: Path = typer.Option(..., "--data", help="YOLO data yaml, COCO directory or instances JSON, or a "
                                                          "Pascal VOC directory"),
          weights: str = typer.Option(..., "--weights", help="a YOLOv8, YOLO11 or YOLO26 .pt checkpoint (or "
                                                                  ".yaml architecture)"),
          imgsz: int | None = typer.Option(None, help="input size (default: the recipe's)"),
          recipe: Path = RecipeOpt, sets: list[str] | None = SetOpt, run_dir: Path | None = RunDirOpt,
          force: bool = typer.Option(False, "--force")):
    """Benchmark a model on a dataset of your own: data -> load -> export -> bench."""
    extra = [f"data.source={data}", f"model.weights={weights}", "prune.enabled=false", "quantize.enabled=false"]
    extra += [f"model.imgsz={imgsz}"] if imgsz else []
    name = run_dir or Path("runs") / f"bench-{Path(data).stem}-{Path(weights).stem}"
    ctx = _ctx(recipe, extra + list(sets or []), name, force)
    # Without data.names (the recipe's or a --set), a dataset whose classes are the checkpoint's in another order is
    # scored in the checkpoint's order; named ones stand (another order is then the load stage's refusal).
    order = None if ctx.recipe.data.names is not None else _checkpoint_order(data, weights)
    if order is not None:
        ctx = _ctx(recipe, extra + [f"data.names={json.dumps(order)}"] + list(sets or []), name, force)
    _run_stages(ctx, ["data", "load", "export", "bench"])
    _print_summary(ctx.run_dir)


def _checkpoint_order(data: Path, weights: str) -> list[str] | None:
    """The checkpoint's class order when the dataset has the same classes in another order, said in one line; None
    otherwise (a different set is the load stage's refusal)."""
    if str(weights).endswith((".yaml", ".yml")):
        return None
    from pipeline.adapters.ultralytics_yolo import load_detection_model
    from pipeline.core.stage import console
    from pipeline.data.formats import load_dataset
    from pipeline.stages.load import model_names

    mine, theirs = model_names(load_detection_model(weights)), load_dataset(data).names
    if sorted(mine) != sorted(theirs) or mine == theirs:
        return None
    console.print(f"{data}: its classes {theirs} are the checkpoint's in another order: scored in the checkpoint's "
                  f"order {mine}")
    return mine


@app.command()
def init(data: Path = typer.Option(..., "--data", help="YOLO data yaml, COCO directory or instances JSON, or a "
                                                         "Pascal VOC directory"),
         weights: str = typer.Option(..., "--weights", help="a YOLOv8, YOLO11 or YOLO26 .pt checkpoint (or "
                                                                  ".yaml architecture)"),
         device: str = typer.Option("cpu", "--device", help="where training runs: cpu, 0, cuda:0 (as ultralytics)"),
         out: Path | None = typer.Option(None, "--out", help="recipe to write (default models/<data>-<weights>.yaml)"),
         sparsity: bool = typer.Option(True, "--sparsity/--no-sparsity", help="sparsity training before the cut "
                                                                               "(the recommended default; about as "
                                                                               "many epochs again as the fine-tune)"),
         imgsz: int | None = typer.Option(None, "--imgsz", help="input size (default: the checkpoint's; 640 for a "
                                                                 "yaml)"),
         force: bool = typer.Option(False, "--force", help="overwrite an existing recipe"),
         speedup: float | None = typer.Option(None, "--speedup", help="prune to this speed-up over the base, timed on "
                                                                       "this box's ONNX Runtime (prune.target; "
                                                                       "default: 0.5x the MACs)")):
    """Write a short recipe for your data and checkpoint (the recommended settings, the fine-tune sized to the data)
    and print what `yolo-edge run` will do with it, stage by stage, with rough times here."""
    from pipeline.init_recipe import init as write_recipe

    _, plan = write_recipe(data, weights, out=out, device=device, sparsity=sparsity, imgsz=imgsz, force=force,
                           speedup=speedup)
    typer.echo(plan)


@app.command()
def report(recipe: Path = RecipeOpt, sets: list[str] | None = SetOpt, run_dir: Path | None = RunDirOpt,
           history: Path | None = typer.Option(None, "--history", help="history database for history.png "
                                                                       "(default benchmarks/history.db)")):
    """Write runs/<run>/report.json, report.md, tradeoff.png, history.png and report.html (self-contained) from
    the last bench and print the table."""
    from pipeline.report.render import render_run
    from pipeline.stages.bench import publish

    ctx = _ctx(recipe, sets, run_dir)
    p = publish(ctx)
    if history is not None:  # publish drew history.png from the default database
        render_run(ctx.run_dir, history)
    typer.echo(p.with_suffix(".md").read_text())
    for name in ("tradeoff.png", "history.png", "report.html"):
        if (ctx.run_dir / name).is_file():
            typer.echo(f"wrote {ctx.run_dir / name}")


@app.command()
def status(recipe: Path = RecipeOpt, sets: list[str] | None = SetOpt, run_dir: Path | None = RunDirOpt):
    """List the stages of a run with their state."""
    from datetime import datetime

    ctx = _ctx(recipe, sets, run_dir)
    typer.echo(f"run: {ctx.run_dir}")
    for s in RECORDS:
        rec = ctx.record(s)
        if rec is None:
            typer.echo(f"  {s:10s} not run")
        else:
            when = datetime.fromtimestamp(rec.finished).strftime("%Y-%m-%d %H:%M:%S")
            typer.echo(f"  {s:10s} done {when}  key {rec.key[:12]}  ({rec.finished - rec.started:.1f}s)  "
                       + ", ".join(f"{k}={Path(v['path']).name}" for k, v in rec.outputs.items()))


@app.command()
def base(recipe: Path = RecipeOpt, sets: list[str] | None = SetOpt, run_dir: Path | None = RunDirOpt,
         epochs: int | None = typer.Option(None, help="one run of this many epochs (default: the recipe's "
                                                      "base.phases)"),
         start: Path | None = typer.Option(None, help="start from these weights instead of the yaml"),
         out: Path | None = typer.Option(None, help="where to write the checkpoint (default: model.weights)")):
    """Train the default base model from its yaml on the recipe's data (what the shipped checkpoint is), then
    (base.check_epochs) show whether more epochs still raise its mAP."""
    from pipeline.core.store import run_lock
    from pipeline.stages import data as data_stage
    from pipeline.stages.base_training import train_base

    ctx = _ctx(recipe, sets, run_dir)
    with run_lock(ctx.run_dir, "`yolo-edge base`"):
        data_stage.run(ctx)
        dest = Path(out or ctx.recipe.model.weights or "models/base/base.pt")
        with _command_log(ctx, "base"):
            shipped = train_base(ctx, dest, epochs, start)
        typer.echo(str(shipped))


def _command_log(ctx, name: str):
    """What the libraries print during a command outside the stages (`base`, `sparsify`): appended to
    runs/<run>/<name>/log.txt (named on the terminal), as a stage's goes to its own log.txt."""
    from pipeline.core.console import captured
    from pipeline.core.stage import console

    log = ctx.run_dir / name / "log.txt"
    log.parent.mkdir(parents=True, exist_ok=True)
    console.print(f"{name}: the libraries' output goes to {log}")
    return captured(log)


@app.command()
def sparsify(recipe: Path = RecipeOpt, sets: list[str] | None = SetOpt, run_dir: Path | None = RunDirOpt,
             out: Path | None = typer.Option(None, help="where to write the weights (default: "
                                                        "prune.sparsity.shipped)")):
    """Sparsity-train the recipe's model on its data (prune.sparsity.phases) and write the weights with the record
    that lets runs with the same model, data and settings reuse them (prune.sparsity.shipped)."""
    from pipeline.stages import sparsity

    ctx = _ctx(recipe, sets, run_dir)
    _run_stages(ctx, ["data", "load"])
    dest = Path(out or ctx.recipe.prune.sparsity.shipped or "models/base/sparse.pt")
    model, data = ctx.output("load", "model"), ctx.output("data", "yolo")
    with _command_log(ctx, "sparsify"):
        sparsity.train(ctx, model, data, dest, sparsity.key_of(ctx, model, data))
    typer.echo(str(dest))


@app.command("engine")
def engine_cmd(recipe: Path = RecipeOpt, sets: list[str] | None = SetOpt, run_dir: Path | None = RunDirOpt,
               print_trtexec: bool = typer.Option(False, "--print-trtexec", help="print the equivalent trtexec "
                                                  "command lines (strongly typed) instead of building"),
               workspace_mib: int = typer.Option(2048, help="TensorRT workspace pool (MiB)"),
               dla_core: int = typer.Option(-1, help="DLA core (-1: GPU only); layers DLA cannot run fall back to GPU"),
               opt_level: int = typer.Option(3, help="TensorRT builder optimization level (0-5)"),
               force: bool = typer.Option(False, "--force")):
    """Strongly typed FP16/INT8 ONNX (checked here), then the TensorRT engines where TensorRT is (the device)."""
    from pipeline.stages import engine

    ctx = _ctx(recipe, sets, run_dir, force)
    if print_trtexec:
        engine.strongly_typed(ctx)
        for line in engine.trtexec_lines(ctx, workspace_mib, dla_core, opt_level):
            typer.echo(line)
        return
    engine.run(ctx, workspace_mib, dla_core, opt_level)


@app.command("check-trt")
def check_trt(path: Path, dynamic: bool = typer.Option(False, "--dynamic", help="allow dynamic input shapes "
                                                                                "(you will give a profile)"),
              trt: str = typer.Option("10.3", "--trt", help="the TensorRT whose ONNX operator table applies: 10.3 "
                                                            "(JetPack 6), 10.6 or 11")):
    """Check an ONNX file (this project's or any tool's, FP32, FP16 or INT8 Q/DQ) against TensorRT's ONNX operator
    table (ops, opsets, types, checkable restrictions) and its explicit-quantization and strong-typing rules."""
    from pipeline.quant.trt_ops import check_file, matrix

    mx = matrix(trt)
    v = check_file(path, trt, dynamic_ok=dynamic)
    if v:
        for x in v[:20]:
            typer.echo(f"  {x}", err=True)
        raise UserError(f"{mx.label} would refuse it: {len(v)} violation(s), first: {v[0]}", path)
    typer.echo(f"{path}: passes {mx.label}'s ONNX operator table ({mx.provenance}), its explicit-quantization and "
               f"strong-typing rules")


StrictOpt = typer.Option(False, "--strict", help="refuse dirty boxes (no area, past the border) instead of dropping "
                                                 "or clipping them")
NamesOpt = typer.Option(None, "--names", help="a VOC set's classes in order, comma-separated (default: the names "
                                              "its objects use, sorted)")


def _names(names: str | None) -> list[str] | None:
    return [n.strip() for n in names.split(",") if n.strip()] if names else None


@app.command("check-data")
def check_data(path: Path, strict: bool = StrictOpt, names: str | None = NamesOpt):
    """Validate a dataset (YOLO data yaml, COCO directory or instances JSON, Pascal VOC directory) and summarize
    it; dirty boxes are listed one warning line per file and counted."""
    from pipeline.data.formats import load_dataset
    from pipeline.stages.data import warn_dirty

    ds = load_dataset(path, strict=strict, names=_names(names))
    warn_dirty(ds)
    summary = {s: {"images": len(v), "boxes": sum(len(i.boxes) for i in v),
                   **({"ignore_regions": n} if (n := sum(len(i.crowd) for i in v)) else {})}
               for s, v in ds.splits.items()}
    typer.echo(json.dumps({"path": str(path), "classes": ds.nc, "names": ds.names, "splits": summary,
                           "dirty_boxes": ds.dirty}, indent=1))


@app.command()
def convert(src: Path, dest: Path, to: str = typer.Option(..., help="yolo or coco"), strict: bool = StrictOpt,
            names: str | None = NamesOpt):
    """Convert a dataset (COCO JSON, YOLO txt or Pascal VOC) to the YOLO txt layout or COCO JSON (images are
    symlinked; VOC's difficult objects stay ignore regions in COCO and are left out of YOLO labels)."""
    from pipeline.data.formats import load_dataset, write_coco, write_yolo
    from pipeline.stages.data import warn_dirty

    if to not in ("yolo", "coco"):  # before the dataset is read
        raise UserError(f"--to must be yolo or coco, got '{to}'")
    ds = load_dataset(src, strict=strict, names=_names(names))
    warn_dirty(ds)
    typer.echo(str(write_yolo(ds, dest) if to == "yolo" else write_coco(ds, dest)))


# --- the trade-off picture and the nightly gate: pipeline/report/ -----------------------------------------------------

HistoryOpt = typer.Option(None, "--history", help="history database (default benchmarks/history.db, or "
                                                  "$YOLO_EDGE_HISTORY)")
baseline_app = typer.Typer(no_args_is_help=True, help="Baselines the gate compares runs with "
                                                      "(benchmarks/baselines/<recipe>.yaml).")
history_app = typer.Typer(no_args_is_help=True, help="The benchmark history (SQLite, benchmarks/history.db).")
app.add_typer(baseline_app, name="baseline")
app.add_typer(history_app, name="history")


@app.command()
def compare(entries: list[str] = typer.Argument(..., help="RUN_DIR:VARIANT[=LABEL], two or more; the first is the "
                                                           "reference"),
            out: Path = typer.Option(Path("runs/compare"), "--out", help="where compare.json and compare.md go"),
            threads: int = typer.Option(2, "--threads", help="ONNX Runtime threads per model"),
            cap_s: float = typer.Option(90.0, "--cap-s", help="seconds of timing at most")):
    """Put variants of different runs side by side (same eval set): paired mAP intervals from their stored
    predictions, and every ONNX file timed again here in one interleaved session."""
    from pipeline.report.compare import compare as run_compare
    from pipeline.report.compare import render

    typer.echo(render(run_compare(entries, out, threads=threads, schedule={"cap_s": cap_s})))


@app.command()
def gate(run_dir: Path = typer.Argument(..., help="a run directory with report.json (runs/<name>)"),
         baseline: Path | None = typer.Option(None, "--baseline", help="baseline yaml (default: the nightly "
                                              "matrix's for this run_dir, else benchmarks/baselines/<recipe>.yaml)"),
         no_latency: bool = typer.Option(False, "--no-latency", help="gate accuracy and counts only (a run on "
                                         "another machine than the baseline's: CI)")):
    """Compare a run's report.json with its baseline: exit 2 on a regression or an unexplained gain beyond a
    tolerance set from measured spread, or on a device or variant missing from the run; one line per failure.
    Writes RUN_DIR/gate.txt."""
    from pipeline.core.store import atomic_path
    from pipeline.report.gate import gate as run_gate
    from pipeline.report.gate import gate_text

    checks, notes = run_gate(run_dir, baseline, latency=not no_latency)
    text = gate_text(checks, notes)
    with atomic_path(Path(run_dir) / "gate.txt") as tmp:
        tmp.write_text(text + "\n")
    bad = [c for c in checks if c.failed]
    for ln in text.splitlines():
        typer.echo(ln, err=ln.startswith("FAIL "))
    if bad:  # exit 2 (main() turns a UserError into its one line and status 2)
        raise UserError(f"gate: {len(bad)} failure(s) of {len(checks)} checks (the FAIL lines above; "
                        f"{Path(run_dir) / 'gate.txt'})")


@baseline_app.command("update")
def baseline_update(reason: str = typer.Option(..., "--reason", help="why the references change (kept in the "
                                                                     "file)"),
                    run_dir: Path | None = RunDirOpt, recipe: Path = RecipeOpt,
                    baseline: Path | None = typer.Option(None, "--baseline", help="baseline yaml to write"),
                    spread: list[Path] | None = typer.Option(None, "--spread", help="another run of the same recipe "
                                                             "under honest variation (OMP_NUM_THREADS, seed; "
                                                             "repeatable): the spread the tolerances are set from")):
    """Rewrite a baseline from the last run's report.json (references from the run, tolerances by rule or as
    hand-edited in the file), keeping the reason."""
    from pipeline.core.config import load_recipe
    from pipeline.report.gate import update_baseline

    rd = run_dir or Path("runs") / load_recipe(recipe, []).name
    typer.echo(f"wrote {update_baseline(rd, reason, baseline, spread)} from {rd}"
               + (f" (spread over {1 + len(spread)} runs)" if spread else ""))


@history_app.command("record")
def history_record(run_dir: Path = typer.Argument(Path("runs/default")), history: Path | None = HistoryOpt):
    """Record a run's report.json in the history (idempotent: the same run twice adds nothing)."""
    from pipeline.report import history as hist

    db = history or hist.default_db()
    new, total = hist.record(run_dir, db)
    typer.echo(f"{db}: {new} of {total} rows new ({run_dir})")


@app.command()
def nightly(matrix: Path = typer.Option(Path("benchmarks/matrix.yaml"), "--matrix", help="what runs nightly"),
            history: Path | None = HistoryOpt, sets: list[str] | None = SetOpt,
            only: list[str] | None = typer.Option(None, "--only", help="run only this matrix entry (repeatable)")):
    """Run the nightly matrix: each entry's pipeline, recorded in the history, drawn, gated against its baseline;
    exit 2 when any entry fails."""
    from pipeline.report import history as hist
    from pipeline.report.nightly import run_matrix

    def run_entry(e: dict) -> None:
        ctx = _ctx(Path(e["recipe"]), list(e.get("sets") or []) + list(sets or []), Path(e["run_dir"]),
                   force=bool(e.get("force", False)))
        _run_stages(ctx, list(STAGES))

    failed = run_matrix(matrix, history or hist.default_db(), run_entry, only, echo=typer.echo)
    if failed:
        raise UserError(f"nightly: {failed} entr{'y' if failed == 1 else 'ies'} failed (the FAIL lines above)")
    typer.echo("nightly: every entry passed its gate")


@app.command("deploy")
def deploy_cmd(hosts: list[str] = typer.Option(..., "--host", help="[name=]user@host[:port] (repeatable: a fleet, "
                                                                    "in parallel)"),
               recipe: Path = RecipeOpt, sets: list[str] | None = SetOpt, run_dir: Path | None = RunDirOpt,
               runner: str = typer.Option("tensorrt", help="tensorrt (the Jetson) or onnxruntime (any machine)"),
               ssh_args: str = typer.Option("", "--ssh-args", help="extra ssh options, e.g. \"-i key -o "
                                                                  "StrictHostKeyChecking=no\" (~/.ssh/config and the "
                                                                  "agent apply as for ssh)"),
               remote_dir: str = typer.Option("yolo-edge", help="on the device, relative to its home ({name}: the "
                                                               "host's name)"),
               remote_python: str | None = typer.Option(None, help="a device Python that already has yolo-edge "
                                                                   "(skips the venv + wheel install)"),
               timeout: float = typer.Option(120, help="seconds per ssh step (copy, install and bench get more)"),
               cap_s: float | None = typer.Option(None, "--cap-s", help="seconds of timing on the device at most "
                                                   "(default: the recipe's bench.cap_s)"),
               max_rounds: int | None = typer.Option(None, help="timing rounds on the device at most (default: the "
                                                     "recipe's)"),
               warmup: int | None = typer.Option(None, help="warm-up calls per timed item on the device")):
    """Bundle the run, copy it to each host over OpenSSH (rsync, else scp), install the wheel in a venv that sees
    JetPack's TensorRT, run yolo-edge-device bench there, and merge each device's report into report.json."""
    from pipeline.deploy import deploy, preflight

    bench_args = [x for flag, v in (("--cap-s", cap_s), ("--max-rounds", max_rounds), ("--warmup", warmup))
                  if v is not None for x in (flag, str(v))]
    from pipeline.core.store import run_lock

    ctx = _ctx(recipe, sets, run_dir)
    parsed = preflight(ctx, hosts)  # before the lock, which would create a mistyped --run-dir
    with run_lock(ctx.run_dir, "`yolo-edge deploy`"):
        rep, outcomes = deploy(ctx, parsed, ssh_args=ssh_args, remote_dir=remote_dir, remote_python=remote_python,
                               runner=runner, timeout=timeout, bench_args=bench_args,
                               log=lambda s: typer.echo(s, err=True))
    failed = [o for o in outcomes if not o.ok]
    if rep is not None:
        from pipeline.report.markdown import render_devices

        typer.echo(render_devices({"devices": {o.host.name: rep["devices"][o.host.name] for o in outcomes if o.ok}}))
    if failed:  # one line naming every failed host (the others' reports are merged)
        raise UserError(f"deploy failed on {len(failed)} of {len(outcomes)} host(s): "
                        + "; ".join(f"{o.host.name} ({o.error})" for o in failed)
                        + ("; the others were merged into report.json" if rep is not None else
                           "; report.json unchanged"))


def main() -> None:
    from pipeline.adapters.offline import offline
    from pipeline.core.stage import CURRENT, fault

    try:
        with offline():  # ultralytics offline for the command (it is imported only inside commands)
            rc = app(standalone_mode=False)
        if rc == 130:  # typer turns a KeyboardInterrupt into a returned 130 outside standalone mode
            raise KeyboardInterrupt
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except UserError as e:
        typer.secho(f"error: {e}" + (f" (its log: {e.log})" if e.log else ""), err=True, fg="red")
        sys.exit(2)
    except KeyboardInterrupt:
        stage, log, done = CURRENT.get("stage"), CURRENT.get("log"), CURRENT.get("finished")
        if stage is None and done:
            typer.secho(f"interrupted after the {done} stage finished: its results and earlier ones are intact",
                        err=True)
        else:
            typer.secho(f"interrupted: the {stage + ' stage' if stage else 'stage'} in progress was discarded"
                        + (f" (its log: {log})" if log else "") + "; earlier results are intact", err=True)
        sys.exit(130)
    except OSError as e:  # a full or read-only disk outside a stage (a report written after it)
        f = fault(e, CURRENT.get("stage"), None)
        if f is None:
            raise
        typer.secho(f"error: {f}", err=True, fg="red")
        sys.exit(2)
    except typer.Abort:
        sys.exit(130)
    except Exception as e:  # usage errors of the (vendored) click layer carry show() and their exit code
        if hasattr(e, "exit_code") and hasattr(e, "show"):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Exit" and hasattr(e, "exit_code"):
            sys.exit(e.exit_code)
        raise


if __name__ == "__main__":
    main()
