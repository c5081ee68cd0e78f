"""The `smoothsal` command: one subcommand per workflow stage.

Each subcommand parses its arguments and calls one library function; logic lives in the modules.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smoothsal",
        description="Smooth hidden-layer saliency maps for whole-slide images.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_tiles,
        _add_train_surrogate,
        _add_evaluate,
        _add_compare,
        _add_saliency,
        _add_heatmaps,
        _add_report,
        _add_view,
        _add_demo,
        _add_train_model,
    ):
        add(sub)
    return parser


# --- tiles (smoothsal.slides) -------------------------------------------------------------------


def _add_tiles(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "tiles",
        help="tissue mask, tile grid and labels of one slide → tile table (Parquet) + overview PNG",
        description="Find tissue on a low pyramid level, lay a tile grid at the target resolution, label "
        "tiles from annotations, and write the tile table and an overview PNG.",
    )
    p.add_argument("slide", type=Path, help="whole-slide image (any format OpenSlide reads)")
    p.add_argument("--out", type=Path, required=True, help="tile table to write (.parquet)")
    p.add_argument("--overview", type=Path, help="overview PNG to write (default: OUT with .png)")
    p.add_argument("--slide-id", help="slide id in the table (default: the file name without suffix)")
    p.add_argument("--annotations", type=Path, help="ASAP XML or GeoJSON annotations, level-0 px")
    p.add_argument(
        "--class-map",
        help="annotation class names → ids, e.g. Tumor=1,Stroma=2,Exclusion=0 (0 = exclusion, "
        "negative = ignore; default: Camelyon16 groups _0/_1/Tumor=1, _2/Exclusion=0)",
    )
    p.add_argument("--mpp", type=float, help="µm/px at level 0, overriding (or replacing missing) metadata")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--target-mpp", type=float, default=0.5, help="tile resolution, µm/px (default 0.5)")
    res.add_argument("--level", type=int, help="read tiles at this pyramid level instead, unresized")
    p.add_argument(
        "--tile-size", type=int, default=224, help="tile side, px at the target resolution (default 224)"
    )
    p.add_argument("--stride", type=int, help="grid step, px at the target resolution (default: tile size)")
    p.add_argument(
        "--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a tile (default 0.5)"
    )
    p.add_argument(
        "--roi", type=int, nargs=4, metavar=("X", "Y", "W", "H"), help="region to tile, level-0 px"
    )
    p.add_argument("--max-tiles", type=int, help="keep a random sample of at most N tiles")
    p.add_argument("--seed", type=int, default=0, help="seed of that sample")
    p.add_argument(
        "--label-threshold", type=float, default=0.5, help="tumour fraction for label 1 (default 0.5)"
    )
    p.add_argument("--mask-mpp", type=float, default=8.0, help="tissue-mask resolution, µm/px (default 8)")
    p.add_argument(
        "--min-saturation", type=float, default=0.08, help="floor of the saturation threshold (default 0.08)"
    )
    p.add_argument(
        "--closing-um", type=float, default=16.0, help="tissue-mask closing radius, µm (default 16)"
    )
    p.add_argument(
        "--min-object-um2", type=float, default=20000.0, help="drop tissue specks up to this area, µm²"
    )
    p.add_argument(
        "--min-hole-um2", type=float, default=20000.0, help="fill holes in tissue up to this area, µm²"
    )
    p.set_defaults(func=_run_tiles)


def _run_tiles(args: argparse.Namespace) -> None:
    from smoothsal import annotations, grid, tiling, tissue

    settings = tiling.TilingSettings(
        grid=grid.TileGridSettings(
            tile_size=args.tile_size, stride=args.stride, target_mpp=args.target_mpp, level=args.level,
            min_tissue=args.min_tissue, roi=tuple(args.roi) if args.roi else None, max_tiles=args.max_tiles,
            seed=args.seed,
        ),
        mask=tissue.TissueMaskSettings(
            mask_mpp=args.mask_mpp, min_saturation=args.min_saturation, closing_um=args.closing_um,
            min_object_um2=args.min_object_um2, min_hole_um2=args.min_hole_um2,
        ),
        labels=tiling.LabelSettings(args.label_threshold),
    )  # fmt: skip
    class_map = annotations.parse_class_map(args.class_map) if args.class_map else None
    tiled = tiling.make_tiles(
        args.slide, args.out, settings, annotations=args.annotations, class_map=class_map, mpp=args.mpp,
        slide_id=args.slide_id, overview=args.overview,
    )  # fmt: skip
    overview = args.overview or args.out.with_suffix(".png")
    print(f"{args.slide}: {len(tiled.table)} tiles → {args.out} (overview {overview})")


# --- train-surrogate / evaluate (smoothsal.training) ---------------------------------------------


def _model_args(p: argparse.ArgumentParser, *, tiles: str = "+") -> None:
    """--arch / --num-classes / --checkpoint / --tiles / normalisation / --workers, shared by the model commands.

    ``tiles="+"``: any number of tile tables (training, evaluation); ``None``: one table (one slide).
    """
    from pathlib import Path

    p.add_argument("--arch", required=True, help="model architecture (see smoothsal.ARCHITECTURES)")
    p.add_argument("--num-classes", type=int, required=True, help="outputs of the model (1 = one logit)")
    p.add_argument("--checkpoint", type=Path, help="model weights (.pt); without it a seeded random init")
    p.add_argument(
        "--tiles", type=Path, nargs=tiles, required=True, metavar="TABLE", help="tile tables (.parquet)"
    )
    for name in ("mean", "std"):
        p.add_argument(
            f"--{name}",
            type=float,
            nargs=3,
            metavar=("R", "G", "B"),
            help=f"input normalisation {name} (default: the surrogate's if given, else ImageNet)",
        )
    p.add_argument(
        "--workers", type=int, help="DataLoader workers per process (default: min(4, cores per process - 1))"
    )


def _add_train_surrogate(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "train-surrogate",
        help="train the bilinear surrogate paths of a model on tiles (multi-GPU: torchrun)",
        description="Train one bilinear surrogate path per downsampling conv of the frozen model (L1 per "
        "path, summed; Adam). Run plainly for one process, or under `torchrun --nproc_per_node N "
        "--no-python smoothsal train-surrogate ...` for N processes (nccl on GPU, gloo on CPU); the "
        "global --batch-size is split evenly across them. Checkpoints every epoch and every "
        "--checkpoint-every steps; a killed run resumes with the same result.",
    )
    _model_args(p)
    p.add_argument("--out", type=Path, required=True, help="surrogate file to write (.pt)")
    p.add_argument("--state", type=Path, help="resumable training state (default: OUT stem + .state.pt)")
    p.add_argument("--log", type=Path, help="per-epoch L1 loss CSV (default: OUT stem + .losses.csv)")
    p.add_argument("--epochs", type=int, default=2, help="epochs (default 2, the paper's Camelyon16 setting)")
    p.add_argument(
        "--batch-size", type=int, default=512, help="global batch size over all processes (default 512)"
    )
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the path init and the tile order")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only; ignored on CPU)")
    p.add_argument(
        "--checkpoint-every", type=int, default=100, help="steps between checkpoints (0: epoch ends only)"
    )
    p.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from --state if present",
    )
    p.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bar on rank 0"
    )
    p.set_defaults(func=_run_train_surrogate)


def _run_train_surrogate(args: argparse.Namespace) -> None:
    from smoothsal import surrogate_run

    options = surrogate_run.RunOptions(
        out=args.out, state=args.state, log=args.log, checkpoint_every=args.checkpoint_every,
        resume=args.resume, workers=args.workers, progress=args.progress,
    )  # fmt: skip
    result = surrogate_run.train_from_tables(
        args.tiles, options, checkpoint=args.checkpoint, mean=args.mean, std=args.std, arch=args.arch,
        num_classes=args.num_classes, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, amp=args.amp,
    )  # fmt: skip
    if result.rank == 0:
        last = result.losses[-1]["l1_total"] if result.losses else float("nan")
        gpu = f", peak GPU MB {[round(m) for m in result.peak_gpu_mb]}" if result.peak_gpu_mb else ""
        print(
            f"{args.out}: {result.tiles} tiles, {result.world} process(es), final L1 {last:.4g}, "
            f"{result.seconds:.1f} s, peak RSS MB {[round(m) for m in result.peak_rss_mb]}{gpu}"
            + (f" (resumed at step {result.resumed_from})" if result.resumed_from else "")
        )


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "evaluate",
        help="accuracy and prediction difference of original / surrogate / forward_hook on tiles",
        description="On (validation) tiles: accuracy over the labelled tiles and the prediction difference "
        "against the original (all classes and target class, ×100, mean ± std) of each smoothing method: "
        "the paper's Tables 2 and 3 for your model. Classification models (tile table `label` column).",
    )
    _model_args(p)
    p.add_argument("--surrogate", type=Path, help="trained surrogate (.pt from train-surrogate)")
    p.add_argument("--out", type=Path, required=True, help="summary table to write (.csv)")
    p.add_argument("--markdown", type=Path, help="the same as markdown (default: OUT with .md)")
    p.add_argument("--per-tile", type=Path, help="per-tile predictions and differences (.parquet)")
    p.add_argument(
        "--methods", nargs="+", default=["original", "surrogate", "forward_hook"],
        help="methods to compare (default: original surrogate forward_hook; surrogate only with --surrogate)",
    )  # fmt: skip
    p.add_argument(
        "--target", choices=("label", "predicted"), default="label", help="target class (default: label)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass (default 64)")
    p.set_defaults(func=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    import torch

    from smoothsal import evaluation
    from smoothsal.surrogate import load_with_surrogate
    from smoothsal.tiles import TileDataset, read_tile_tables, tile_labels

    table = read_tile_tables(args.tiles)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, surrogate, norm = load_with_surrogate(
        args.arch, num_classes=args.num_classes, checkpoint=args.checkpoint, surrogate=args.surrogate,
        mean=args.mean, std=args.std, device=device,
    )  # fmt: skip
    methods = [m for m in args.methods if m != "surrogate" or surrogate is not None]
    result = evaluation.evaluate(
        model, TileDataset(table, transform=norm), tile_labels(table), methods=methods,
        surrogate=surrogate, target=args.target, batch_size=args.batch_size, workers=args.workers or 0,
    )  # fmt: skip
    evaluation.write_summary(result.summary, args.out, args.markdown or args.out.with_suffix(".md"))
    if args.per_tile:
        from smoothsal.tiles import write_tile_table

        write_tile_table(evaluation.per_tile_table(table, result), args.per_tile)
    print(evaluation.to_markdown(result.summary), end="")


# --- compare (smoothsal.report) ------------------------------------------------------------------


def _add_compare(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "compare",
        help="saliency of every smoothing method on one tile image, side by side (PNG)",
        description="Gradient and DeepLift at one hidden layer for each smoothing method on one "
        "RGB tile image, with their total variation: a quick look before a slide-scale run.",
    )
    p.add_argument("tile", type=Path, help="RGB(A) tile image (PNG/JPEG), any size")
    p.add_argument("--out", type=Path, required=True, help="figure to write (.png)")
    p.add_argument("--arch", default="resnet18", help="model architecture (default resnet18)")
    p.add_argument("--num-classes", type=int, default=2, help="model outputs (default 2)")
    p.add_argument("--checkpoint", type=Path, help="trained weights (default: a seeded random init)")
    p.add_argument("--surrogate", type=Path, help="trained surrogate (adds the surrogate method)")
    p.add_argument("--layer", default="layer2", help="layer name or alias (default layer2)")
    p.add_argument("--target", type=int, default=0, help="target class (default 0)")
    p.add_argument("--size", type=int, default=224, help="tile side fed to the model, px")
    p.add_argument("--samples", type=int, default=20, help="SmoothGrad samples (0: off)")
    p.add_argument("--stdev", type=float, default=0.2, help="SmoothGrad noise σ")
    p.set_defaults(func=_run_compare)


def _run_compare(args: argparse.Namespace) -> None:
    import numpy as np
    import torch
    from PIL import Image, UnidentifiedImageError

    from smoothsal import report
    from smoothsal.attribution import SmoothGrad
    from smoothsal.surrogate import load_with_surrogate

    try:
        image = Image.open(args.tile).convert("RGB").resize((args.size, args.size))
    except (OSError, UnidentifiedImageError) as err:
        raise CommandError(f"{args.tile}: not a readable image ({err}); give a PNG or JPEG tile")
    rgb = np.asarray(image)
    model, surrogate, norm = load_with_surrogate(
        args.arch, num_classes=args.num_classes, checkpoint=args.checkpoint, surrogate=args.surrogate
    )
    x = norm(torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0).unsqueeze(0)
    methods = ["original", "backward_hook", "forward_hook"] + (["surrogate"] if surrogate else [])
    smoothgrad = SmoothGrad(args.samples, args.stdev, seed=0) if args.samples else None
    maps = report.compare_methods(
        model, x, layer=args.layer, target=args.target, methods=methods,
        surrogate=surrogate, smoothgrad=smoothgrad,
    )  # fmt: skip
    weights = args.checkpoint.name if args.checkpoint else "random weights"
    title = f"{args.arch} ({weights}), {args.layer}, target {args.target}, {args.tile.name}"
    report.comparison_figure(rgb, maps, title, args.out)
    print(f"wrote {args.out}")


# --- saliency (smoothsal.saliency) ----------------------------------------------------------------


def _add_saliency(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "saliency",
        help="every layer × attribution map of every tile of one slide under one method (Zarr + Parquet)",
        description="Stream the slide's tiles in batches, compute gradient / DeepLift maps at the given "
        "layers (SmoothGrad seeded per tile) under one smoothing method, and write the channel-summed maps "
        "(Zarr v2 store, one array per attribution/layer) and a per-tile table (TV of the full maps, "
        "logits, prediction difference vs the original model). Resumable: a killed job continues from its "
        "last complete batch (state in a hidden .OUT.partial/ beside OUT).",
    )
    # fmt: off
    p.add_argument("slide", type=Path, help="whole-slide image the tile table was made from")
    # fmt: on
    _model_args(p, tiles=None)  # --tiles: the tile table of SLIDE (from `smoothsal tiles`)
    # fmt: off
    p.add_argument("--surrogate", type=Path, help="trained surrogate (.pt from train-surrogate); needed by --method surrogate")
    p.add_argument("--method", required=True, help="smoothing method: original, surrogate, backward_hook, forward_hook")
    p.add_argument("--layers", nargs="+", required=True, help="layer names or aliases (layer1 … layer4, blocks, module names)")
    p.add_argument("--attributions", nargs="+", default=["gradient", "deeplift"], help="gradient and/or deeplift (default both)")
    p.add_argument("--smoothgrad-samples", type=int, default=20, help="SmoothGrad samples per tile (default 20; 0 = off)")
    p.add_argument("--smoothgrad-stdev", type=float, default=0.2, help="SmoothGrad noise σ in normalised input units (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-tile SmoothGrad noise (default 0)")
    p.add_argument("--target", choices=("label", "predicted"), default="label", help="target class (default: label, predicted where unlabelled)")
    p.add_argument("--task", choices=("classification", "segmentation"), default="classification", help="model kind (segmentation: target = tile majority_class)")
    p.add_argument("--dataset", default="", help="dataset name written into the table")
    p.add_argument("--batch-size", type=int, default=8, help="tiles per batch (default 8; does not change results)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="default auto: CUDA when present")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--out", type=Path, required=True, help="saliency store to write ({method}.zarr directory)")
    p.add_argument("--table", type=Path, required=True, help="per-tile table to write ({method}.parquet)")
    # fmt: on
    p.set_defaults(func=_run_saliency)


def _run_saliency(args: argparse.Namespace) -> None:
    from smoothsal import saliency

    settings = saliency.SaliencySettings(
        arch=args.arch, num_classes=args.num_classes, method=args.method, layers=tuple(args.layers),
        attributions=tuple(args.attributions), smoothgrad_samples=args.smoothgrad_samples,
        smoothgrad_stdev=args.smoothgrad_stdev, seed=args.seed, target=args.target, task=args.task,
        dataset=args.dataset, mean=tuple(args.mean) if args.mean else None, std=tuple(args.std) if args.std else None,
    )  # fmt: skip
    options = saliency.RunOptions(
        out=args.out, table=args.table, batch_size=args.batch_size, workers=args.workers, device=args.device,
        progress=args.progress,
    )  # fmt: skip
    result = saliency.run_saliency(
        args.slide, args.tiles, settings, options, checkpoint=args.checkpoint, surrogate=args.surrogate
    )
    resumed = f", resumed at tile {result.resumed_from}" if result.resumed_from else ""
    rate = result.computed / result.compute_seconds if result.compute_seconds else float("nan")
    print(
        f"{args.slide}: {result.n_tiles} tiles ({result.computed} computed{resumed}, {rate:.2f} tiles/s "
        f"on {result.device}) → {args.out}, {args.table}"
    )


# --- heatmaps (smoothsal.heatmaps) ----------------------------------------------------------------


def _add_heatmaps(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "heatmaps",
        help="stitch one slide's saliency stores into one OME-Zarr container (tissue + heatmap pyramids)",
        description="Write SLIDE.ome.zarr: the tissue as an RGB pyramid at ~--tissue-mpp µm/px and one float32 "
        "pyramid per method × attribution × layer, stitched from the per-tile maps (overlaps blended), all "
        "with µm coordinateTransformations so they overlay in napari/QuPath/vizarr. Chunk-wise: memory does "
        "not grow with the slide. Written under a hidden .OUT.partial and renamed at the end.",
    )
    # fmt: off
    p.add_argument("slide", type=Path, help="whole-slide image the tiles were made from")
    p.add_argument("--saliency", type=Path, nargs="+", required=True, metavar="STORE", help="saliency stores of SLIDE ({method}.zarr from `smoothsal saliency`)")
    p.add_argument("--tiles", type=Path, required=True, help="tile table of SLIDE (.parquet) the stores were computed on")
    p.add_argument("--mpp", type=float, help="µm/px at level 0, as given to `smoothsal tiles` (for slides without it)")
    p.add_argument("--annotations", type=Path, help="ASAP XML or GeoJSON annotations to store with the maps (level-0 px)")
    p.add_argument("--class-map", help="annotation class names → ids, as for `smoothsal tiles`")
    p.add_argument("--tissue-mpp", type=float, default=2.0, help="tissue image resolution, µm/px (default 2)")
    p.add_argument("--no-tissue", dest="tissue", action="store_false", help="leave the tissue image out")
    p.add_argument("--blend", choices=("none", "mean", "window"), default="window", help="overlapping tiles: none (last wins), mean, window (Hann-weighted; default)")
    p.add_argument("--ngff", choices=("0.4", "0.5"), default="0.4", help="OME-Zarr version: 0.4 on Zarr v2 (default, widest viewer support) or 0.5 on Zarr v3")
    p.add_argument("--chunk", type=int, default=512, help="chunk side, px (default 512, at least 256)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    p.add_argument("--out", type=Path, required=True, help="container to write (SLIDE.ome.zarr directory)")
    p.add_argument("--ome-tiff", nargs=2, action="append", default=[], metavar=("IMAGE", "FILE"), help="also export IMAGE (e.g. heatmaps/original/gradient/layer2, or tissue) as a pyramidal OME-TIFF FILE for QuPath; repeatable")
    # fmt: on
    p.set_defaults(func=_run_heatmaps)


def _run_heatmaps(args: argparse.Namespace) -> None:
    from smoothsal import annotations, heatmaps

    settings = heatmaps.HeatmapSettings(
        tissue_mpp=args.tissue_mpp, blend=args.blend, ngff=args.ngff, chunk=args.chunk, tissue=args.tissue
    )
    class_map = annotations.parse_class_map(args.class_map) if args.class_map else None
    out = heatmaps.make_heatmaps(
        args.slide, args.saliency, args.tiles, args.out, settings, mpp=args.mpp, annotations=args.annotations,
        class_map=class_map, progress=args.progress,
        ome_tiff=[tuple(pair) for pair in args.ome_tiff],
    )  # fmt: skip
    images = heatmaps.read_container(out).images
    tiffs = "".join(f", {image} → {path}" for image, path in args.ome_tiff)
    print(f"{args.slide}: {len(images)} images → {out}{tiffs}")


# --- report (smoothsal.report) -------------------------------------------------------------------


def _add_report(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "report",
        help="the paper's tables and figures over every slide's per-tile tables → index.html",
        description="Aggregate the per-tile tables of `smoothsal saliency` (any number of slides, datasets "
        "and methods): TV (Table 4 layout, lowest per row in bold), TV reduction vs the original, "
        "prediction difference (Table 3), accuracy where tiles are labelled (Table 2), per-slide "
        "breakdowns, TV per layer (Figure 4) and, with --heatmaps, one overview figure per slide. "
        "Writes tables/*.csv|md, figures/*.png|svg and a self-contained index.html under --out.",
    )
    p.add_argument("--tables", type=Path, nargs="+", required=True, metavar="TABLE",
                   help="per-tile tables (.parquet) from `smoothsal saliency --table`")  # fmt: skip
    p.add_argument("--heatmaps", type=Path, nargs="*", default=[], metavar="CONTAINER",
                   help="heatmap containers (.ome.zarr) from `smoothsal heatmaps`: one overview figure each")  # fmt: skip
    p.add_argument("--out", type=Path, required=True, help="report directory (replaced as a whole)")
    p.add_argument("--title", default="smoothsal report", help="title of index.html")
    p.add_argument("--percentile", type=float, default=99.0,
                   help="colour limit per overview row: this percentile of |value| (default 99)")  # fmt: skip
    p.add_argument("--alpha", type=float, default=0.65, help="heatmap opacity over the tissue (default 0.65)")
    p.add_argument("--thumbnail-px", type=int, default=384,
                   help="read the smallest pyramid level with a side of at least this (default 384)")  # fmt: skip
    p.set_defaults(func=_run_report)


def _run_report(args: argparse.Namespace) -> None:
    from smoothsal import report

    settings = report.ReportSettings(
        title=args.title, percentile=args.percentile, alpha=args.alpha, thumbnail_px=args.thumbnail_px
    )
    result = report.write_report(args.tables, args.out, args.heatmaps, settings)
    print(
        f"{result.out / 'index.html'}: {len(result.tables)} tables, {len(result.figures)} figures "
        f"from {len(args.tables)} per-tile tables" + "".join(f"; {n}" for n in result.notes)
    )


# --- view (smoothsal.viewer) ---------------------------------------------------------------------


def _add_view(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "view",
        help="look at a heatmap container in the browser (local server), as a static site, or in napari",
        description="Serve CONTAINER (from `smoothsal heatmaps`) on 127.0.0.1 only: a page with the tissue "
        "and a heatmap overlay in two synchronised panels (method, attribution, layer, colour map, opacity, "
        "range from robust percentiles, tile grid, annotations). Tiles are read on demand at the level the "
        "screen needs, so whole-slide containers open at once. On a cluster node: "
        "`ssh -L PORT:127.0.0.1:PORT node`, then open http://127.0.0.1:PORT/ locally.",
    )
    p.add_argument("container", type=Path, help="heatmap container (SLIDE.ome.zarr)")
    p.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (default 8765; 0: any free one)")
    p.add_argument("--open", action="store_true", help="open the page in the default browser")
    p.add_argument("--verbose", action="store_true", help="log every request")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--export", type=Path, metavar="DIR", help="instead: write page, manifest, tiles to DIR (static site)"
    )
    mode.add_argument("--napari", action="store_true", help="instead: open it in napari (if installed)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar (--export)")
    p.set_defaults(func=_run_view)


def _run_view(args: argparse.Namespace) -> None:
    from smoothsal import viewer

    if args.napari:
        try:
            viewer.open_napari(args.container)
        except ImportError as err:
            raise CommandError(str(err)) from None
    elif args.export:
        result = viewer.export(args.container, args.export, progress=args.progress)
        print(
            f"{args.container} → {result.out}: {result.tiles} tiles, {result.bytes / 2**20:.1f} MiB; "
            f"view with `python -m http.server --bind 127.0.0.1 --directory {result.out}`"
        )
    else:
        viewer.serve(args.container, port=args.port, open_browser=args.open, verbose=args.verbose)


# --- demo-data / train-model (smoothsal.demo, smoothsal.training) ----------------------------------


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "demo-data",
        help="write the deterministic synthetic demo slides (pyramidal TIFF, 0.5 µm/px) and annotations",
        description="Synthetic H&E-like slides for the demo workflow and tests: pink stroma, purple nuclei; "
        "tumour regions with larger, darker, denser, irregular nuclei. Writes OUT/camelyon16/*.tif with ASAP "
        "XML tumour annotations, OUT/digipath/*.tif with GeoJSON (Tumor, Stroma), and *_nuclei.png (the "
        "level-0 nucleus mask). The same --seed and --size give the same files.",
    )
    p.add_argument("--out", type=Path, required=True, help="folder to write into (e.g. demo/)")
    p.add_argument("--seed", type=int, default=0, help="seed of every slide (default 0)")
    p.add_argument("--size", type=int, default=3072, help="slide side, px at 0.5 µm/px (default 3072)")
    p.add_argument("--slides", nargs="+", metavar="NAME", help="only these slides (e.g. tumor_001 digi_003)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> None:
    from smoothsal import demo

    settings = demo.DemoSettings(args.size, args.seed)
    written = demo.make_demo_data(args.out, settings, demo.select_slides(args.slides), progress=args.progress)
    print(f"{args.out}: {len(written)} files (slides, annotations, nucleus masks)")


def _add_train_model(sub: argparse._SubParsersAction) -> None:
    from pathlib import Path

    p = sub.add_parser(
        "train-model",
        help="train a small tile classifier or segmenter on CPU (the demo models)",
        description="Seeded supervised training from a random init: a classifier learns the tile table's "
        "`label` (cross-entropy, classes weighted by inverse frequency); a segmenter (unet_resnet34) learns "
        "per-pixel classes rasterised from --annotations. Random flips/turns. Writes a checkpoint that "
        "load_model(arch, num_classes=K, checkpoint=OUT) reads.",
    )
    p.add_argument("--arch", required=True, help="model architecture (e.g. resnet18, unet_resnet34)")
    p.add_argument("--num-classes", type=int, required=True, help="classes ≥ 2 (with background)")
    p.add_argument("--tiles", type=Path, nargs="+", required=True, metavar="TABLE",
                   help="tile tables (.parquet)")  # fmt: skip
    p.add_argument("--annotations", type=Path, nargs="+", metavar="FILE",
                   help="segmentation: one annotation file per tile table, same order")  # fmt: skip
    p.add_argument("--class-map", help="annotation class names → ids (e.g. Tumor=1,Stroma=2)")
    p.add_argument("--epochs", type=int, default=4, help="epochs (default 4)")
    p.add_argument("--batch-size", type=int, default=32, help="tiles per step (default 32)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the init, tile order and augmentation")
    rgb = ("R", "G", "B")
    p.add_argument("--mean", type=float, nargs=3, metavar=rgb, help="normalisation mean (default ImageNet)")
    p.add_argument("--std", type=float, nargs=3, metavar=rgb, help="normalisation std (default ImageNet)")
    p.add_argument("--out", type=Path, required=True, help="checkpoint to write (.pt)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.set_defaults(func=_run_train_model)


def _run_train_model(args: argparse.Namespace) -> None:
    from smoothsal import annotations, demo_models
    from smoothsal.models import IMAGENET_MEAN, IMAGENET_STD

    settings = demo_models.ModelSettings(
        arch=args.arch, num_classes=args.num_classes, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        seed=args.seed, mean=tuple(args.mean or IMAGENET_MEAN), std=tuple(args.std or IMAGENET_STD),
    )  # fmt: skip
    class_map = annotations.parse_class_map(args.class_map) if args.class_map else None
    result = demo_models.run_model_training(
        settings, args.tiles, args.out, annotations=args.annotations, class_map=class_map,
        progress=args.progress,
    )  # fmt: skip
    last = result.history[-1]
    print(
        f"{args.out}: {args.arch} ({result.task}), {settings.epochs} epochs in {result.seconds:.0f} s, "
        f"final loss {last['loss']:.4f}, training accuracy {last['train_accuracy']:.3f}"
    )


# --- entry point ----------------------------------------------------------------------------------


class CommandError(Exception):
    """A user-facing failure: printed as one line, exit status 1."""


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        args.func(args)
    except (CommandError, ValueError, OSError) as err:  # bad input, unreadable or unwritable files
        print(f"smoothsal {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except RuntimeError as err:  # torch refusing an input (e.g. a tile too small for the model)
        if os.environ.get("SMOOTHSAL_DEBUG"):
            raise
        print(
            f"smoothsal {args.command}: error: {_one_line(err)} (set SMOOTHSAL_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
