"""When does the surrogate converge on the demo's setting, and how well does it then fit?

Trains a surrogate with the convergence rule (one process, `surrogate_run.run_training`) on the train
tiles of a finished demo run (its tile tables and trained `model.pt`), then measures the kept paths on
the demo's EVAL tiles against the original model, next to the forward hook on the same tiles:
prediction difference (all classes, target class, ×100; segmentation also masked) and agreement.

    python benchmarks/surrogate_convergence.py --results ../demo-before/results --dataset camelyon16 \\
        --batch-size 32 --lr 1e-3 --epochs 40 --patience 3

    python benchmarks/surrogate_convergence.py --results ../demo-before/results --dataset digipath \
        --surrogate /tmp/s/digipath/surrogate.pt    # measure a trained file (train-surrogate's) only

Prints one markdown row (and the loss log) per run; `--json FILE` appends the numbers. Wall times
on the shared 2-core machine depend on the load: the row gives the 1-minute load average before and
after. The classifier's numbers are cross-checked against `smoothsal.evaluation` (the evaluate stage).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
from pathlib import Path

import pandas as pd
import torch

from smoothsal.evaluation import evaluate
from smoothsal.hardware import describe
from smoothsal.model_spec import load_model
from smoothsal.smoothing import smooth
from smoothsal.surrogate import TrainSettings, read_surrogate
from smoothsal.surrogate_fit import prediction_sums, summarise_predictions
from smoothsal.surrogate_run import RunOptions, run_training
from smoothsal.tiles import TileDataset, TileLoader, majority_classes, read_tile_tables, tile_labels

DATASETS = {
    "camelyon16": ("resnet18", 2, ["tumor_001", "tumor_002", "normal_001", "normal_002"], ["test_001", "test_002"]),
    "digipath": ("unet_resnet34", 3, ["digi_001", "digi_002"], ["digi_003"]),
}  # fmt: skip


def _cpu_seconds() -> float:
    """User + system CPU time of this process and its finished DataLoader workers."""
    me, workers = (resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + workers.ru_utime + workers.ru_stime


def eval_measures(model, smoothed, table: pd.DataFrame, norm) -> dict[str, float | None]:
    """`surrogate_fit`'s measures of ``smoothed`` against ``model`` on every tile of ``table``."""
    loader = TileLoader(TileDataset(table, transform=norm), batch_size=32)
    sums = prediction_sums(model, smoothed, loader, tile_labels(table), majority_classes(table))
    return summarise_predictions(sums)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, required=True, help="results/ of a finished demo run")
    p.add_argument("--dataset", choices=DATASETS, required=True)
    for name, kind in (("epochs", int), ("batch-size", int), ("lr", float), ("patience", int),
                       ("min-delta", float), ("val-fraction", float), ("val-min-tiles", int), ("init", str)):  # fmt: skip
        p.add_argument(f"--{name}", type=kind)
    p.add_argument("--workers", type=int, help="DataLoader workers (default: as the stage)")
    p.add_argument(
        "--surrogate", type=Path, help="measure this trained surrogate file instead of training one"
    )
    p.add_argument("--json", type=Path, help="append the numbers to this JSON-lines file")
    args = p.parse_args()
    print(describe("cpu"), flush=True)  # the machine every figure below was measured on
    arch, classes, train, held = DATASETS[args.dataset]
    root = args.results / args.dataset
    checkpoint = root / "model.pt"
    table = read_tile_tables([root / "tiles" / f"{s}.parquet" for s in train])
    eval_table = read_tile_tables([root / "tiles" / f"{s}.parquet" for s in held])
    choices = {
        k: v for k, v in vars(args).items() if v is not None and k in TrainSettings.__dataclass_fields__
    }
    settings = TrainSettings.for_tiles(
        table, checkpoint=checkpoint, arch=arch, num_classes=classes, **choices
    )
    load_before = os.getloadavg()[0]
    cpu = _cpu_seconds()
    if args.surrogate:
        paths, meta = read_surrogate(args.surrogate)
        settings, seconds, losses = meta.settings, float("nan"), meta.losses
    else:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "surrogate.pt"
            options = RunOptions(out=out, workers=args.workers, progress=False)
            result = run_training(settings, table, options, checkpoint=checkpoint)
            paths, meta = read_surrogate(out)
        seconds, losses = result.seconds, result.losses
    load_after = os.getloadavg()[0]
    cpu_s = _cpu_seconds() - cpu
    model = load_model(arch, num_classes=classes, checkpoint=checkpoint).eval()
    norm = settings.normalize
    with torch.no_grad():
        surrogate = eval_measures(model, smooth(model, "surrogate", surrogate=paths), eval_table, norm)
        example = TileDataset(eval_table, transform=norm)[0][0][None]
        hook = eval_measures(model, smooth(model, "forward_hook", example=example), eval_table, norm)
    fit = meta.fit
    record = {
        "dataset": args.dataset, "settings": {k: getattr(settings, k) for k in (
            "epochs", "batch_size", "lr", "patience", "min_delta", "val_fraction", "val_min_tiles", "init")},
        "train_tiles": fit.train_tiles, "validation_tiles": fit.validation_tiles, "eval_tiles": len(eval_table),
        "stop_reason": fit.stop_reason, "epochs_run": fit.epochs_run, "steps": fit.steps,
        "kept_epoch": fit.kept_epoch, "seconds": seconds, "cpu_seconds": cpu_s, "load": [load_before, load_after],
        "val_l1_total": fit.val_l1_total, "val_rel_l1_max": fit.val_rel_l1_max,
        "val_pd_all": fit.pd_all_mean, "val_agreement": fit.agreement,
        "eval_surrogate": surrogate, "eval_forward_hook": hook,
    }  # fmt: skip
    s, h = surrogate, hook
    masked = f" / masked {s['pd_masked_mean']:.3f}" if s["pd_masked_mean"] is not None else ""
    hmasked = f" / masked {h['pd_masked_mean']:.3f}" if h["pd_masked_mean"] is not None else ""
    print(pd.DataFrame(list(losses))[["epoch", "steps", "l1_total", "val_l1_total"]].to_string(index=False))
    print(
        f"| {args.dataset} | bs {settings.batch_size} lr {settings.lr:g} cap {settings.epochs} patience "
        f"{settings.patience} δ {settings.min_delta:g} init {settings.init} val {fit.validation_tiles}/{fit.train_tiles} "
        f"| {fit.epochs_run} ({fit.steps} steps, kept {fit.kept_epoch}) | {fit.stop_reason} "
        f"| {seconds:.0f} s, cpu {cpu_s:.0f} s (load {load_before:.1f}→{load_after:.1f}) "
        f"| {fit.val_l1_total:.3f} / max rel {fit.val_rel_l1_max:.3f} "
        f"| {s['pd_all_mean']:.3f} / {s['pd_target_mean']:.3f}{masked} | {s['agreement']:.1f} "
        f"| {h['pd_all_mean']:.3f} / {h['pd_target_mean']:.3f}{hmasked} | {h['agreement']:.1f} |"
    )
    if args.dataset == "camelyon16":  # the evaluate stage's numbers on the same tiles
        check = evaluate(
            model, TileDataset(eval_table, transform=norm), tile_labels(eval_table), surrogate=paths,
            methods=("original", "surrogate", "forward_hook"),
        ).summary.set_index("method")  # fmt: skip
        for method, mine in (("surrogate", surrogate), ("forward_hook", hook)):
            assert abs(check.loc[method, "pd_all_mean"] - mine["pd_all_mean"]) < 1e-3, (
                method,
                check.loc[method],
            )
            assert abs(check.loc[method, "agreement"] - mine["agreement"]) < 1e-4, (method, check.loc[method])
    if args.json:
        with args.json.open("a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
