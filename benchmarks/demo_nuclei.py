"""Do the demo classifier's saliency maps land on nuclei? Measured on the workflow's own outputs.

For every tumour tile (label 1) of the demo's evaluation slides, the stored map (summed over
channels) is upsampled to tile pixels and |map| is averaged over nucleus pixels (the generator's
ground-truth mask, `{slide}_nuclei.png`) and over the other tissue pixels. A ratio above 1 means the
map is stronger on nuclei. Run after `snakemake --cores all` (the demo):

    python benchmarks/demo_nuclei.py --results results --dataset camelyon16 --slides test_001 test_002
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
import zarr

from smoothsal.demo import read_nuclei_mask
from smoothsal.hardware import describe
from smoothsal.tiles import TileDataset
from smoothsal.tissue import hsv_saturation


def tile_masks(table: pd.DataFrame, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Nucleus and non-nucleus tissue masks [N, size, size] of the tiles, from the ground truth."""
    nuclei, tissue, masks = [], [], {}
    data = TileDataset(table)
    for i, row in table.iterrows():
        path = row["slide_path"]
        if path not in masks:
            masks[path] = read_nuclei_mask(path)
        box = masks[path][row.y : row.y + row.h, row.x : row.x + row.w].astype(np.float32)
        f = int(row.w) // size
        nucleus = box.reshape(size, f, size, f).mean((1, 3)) > 0.5
        rgb = data[i][0].permute(1, 2, 0).numpy()
        nuclei.append(nucleus)
        tissue.append((hsv_saturation(rgb) > 0.1) & ~nucleus)
    return np.stack(nuclei), np.stack(tissue)


def ratios(results: Path, dataset: str, slide: str, method: str, layer: str) -> dict[str, tuple[float, int]]:
    """attribution → (mean |map| on nuclei / on other tissue, tumour tiles) for one slide and method."""
    table = pd.read_parquet(results / dataset / "tiles" / f"{slide}.parquet")
    keep = np.flatnonzero(table["label"].to_numpy() == 1)
    if len(keep) == 0:
        return {}
    table = table.iloc[keep].reset_index(drop=True)
    size = int(table["tile_size"].iloc[0])
    nuclei, tissue = tile_masks(table, size)
    store = zarr.open_group(str(results / dataset / "saliency" / slide / f"{method}.zarr"), mode="r")
    out = {}
    for attribution in store.group_keys():
        maps = torch.from_numpy(np.asarray(store[f"{attribution}/{layer}"][:])[keep])
        up = F.interpolate(maps[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        a = up.abs().numpy()
        out[attribution] = (float(a[nuclei].mean() / a[tissue].mean()), len(keep))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=Path("results"))
    p.add_argument("--dataset", default="camelyon16")
    p.add_argument("--slides", nargs="+", default=["test_001", "test_002"])
    p.add_argument("--methods", nargs="+", default=["original", "surrogate", "backward_hook", "forward_hook"])
    p.add_argument("--layer", default="layer1")
    args = p.parse_args()
    print(describe("cpu"), flush=True)  # the machine every figure below was measured on
    for slide in args.slides:
        for method in args.methods:
            for attribution, (ratio, n) in ratios(
                args.results, args.dataset, slide, method, args.layer
            ).items():
                print(
                    f"{slide} {method:13s} {attribution:8s} {args.layer}: nucleus/tissue |map| = {ratio:.2f} ({n} tumour tiles)"
                )


if __name__ == "__main__":
    main()
