"""Per-tile maps of every method stitched into one OME-Zarr container per slide (tissue + pyramids)."""


rule heatmaps:
    input:
        slide=get_slide,
        tiles="results/{dataset}/tiles/{slide}.parquet",
        saliency=get_saliency_stores,
        annotation=get_annotation,
    output:
        directory("results/{dataset}/heatmaps/{slide}.ome.zarr"),
    params:
        settings=heatmaps_settings,
        mpp=slide_mpp,
        annotation=lambda wildcards, input: optional("--annotations", input.annotation),
        version=VERSION,
    log:
        "results/logs/heatmaps/{dataset}/{slide}.log",
    benchmark:
        "results/benchmarks/heatmaps/{dataset}/{slide}.tsv"
    resources:
        mem_mb=8000,
        runtime=60,
    threads: 1
    conda:
        "../../envs/smoothsal.yaml"
    shell:
        "smoothsal heatmaps {input.slide:q} --saliency {input.saliency:q} --tiles {input.tiles:q}"
        " {params.mpp} {params.annotation} {params.settings} --no-progress --out {output:q} > {log:q} 2>&1"


rule qupath_tiles:
    """Config qupath.tiles: the slide's tile objects with measurements for QuPath's measurement maps."""
    input:
        container="results/{dataset}/heatmaps/{slide}.ome.zarr",
        tables=get_saliency_tables,
    output:
        "results/{dataset}/qupath/{slide}.geojson.gz",
    params:
        settings=qupath_settings,
        version=VERSION,
    log:
        "results/logs/qupath/{dataset}/{slide}.log",
    benchmark:
        "results/benchmarks/qupath/{dataset}/{slide}.tsv"
    resources:
        mem_mb=4000,
        runtime=30,
    threads: 1
    conda:
        "../../envs/smoothsal.yaml"
    shell:
        "smoothsal export {input.container:q} --qupath-tiles --gzip --tables {input.tables:q} {params.settings}"
        " --out {output:q} > {log:q} 2>&1"
