"""Seams: the slides of config seams.slides tiled again at half stride, saliency of every method on those
tiles, then stitched twice from the same stores (non-overlapping tiles without blending; every tile with
Hann-window blending) with the seam score of every map: one job per stage and slide (× method)."""


rule seams_tiles:
    input:
        slide=get_slide,
        annotation=get_annotation,
    output:
        table="results/{dataset}/seams/{slide}/tiles.parquet",
        overview="results/{dataset}/seams/{slide}/tiles.png",
    params:
        settings=seams_tiles_settings,
        mpp=slide_mpp,
        fingerprint=slide_fingerprint,
        annotation=lambda wildcards, input: optional("--annotations", input.annotation),
        version=VERSION,
    log:
        "results/logs/seams/{dataset}/{slide}/tiles.log",
    benchmark:
        "results/benchmarks/seams/{dataset}/{slide}/tiles.tsv"
    resources:
        mem_mb=4000,
        runtime=60,
    threads: 1
    conda:
        "../../envs/smoothsal.yaml"
    shell:
        "smoothsal tiles {input.slide:q} --slide-id {wildcards.slide:q} {params.annotation} {params.mpp}"
        " {params.settings} --out {output.table:q} --overview {output.overview:q} > {log:q} 2>&1"


rule seams_saliency:
    input:
        slide=get_slide,
        tiles="results/{dataset}/seams/{slide}/tiles.parquet",
        model=get_model,
        code=get_model_code,
        surrogate=get_surrogate,
    output:
        store=directory("results/{dataset}/seams/{slide}/saliency/{method}.zarr"),
        table="results/{dataset}/seams/{slide}/saliency/{method}.parquet",
    params:
        settings=saliency_settings,
        checkpoint=lambda wildcards, input: optional("--checkpoint", input.model),
        surrogate=lambda wildcards, input: optional("--surrogate", input.surrogate),
        version=VERSION,
        run=lambda wildcards, threads: RunOptions(**config["saliency"], workers=threads - 1),
    log:
        "results/logs/seams/{dataset}/{slide}/saliency/{method}.log",
    benchmark:
        "results/benchmarks/seams/{dataset}/{slide}/saliency/{method}.tsv"
    resources:
        mem_mb=8000,
        runtime=240,
        gpu=0,
    threads: threads_up_to(2)
    conda:
        "../../envs/smoothsal.yaml"
    shell:
        "smoothsal saliency {input.slide:q} --tiles {input.tiles:q} {params.settings} {params.checkpoint}"
        " {params.surrogate} --method {wildcards.method} --dataset {wildcards.dataset:q}"
        " {params.run} --no-progress --out {output.store:q} --table {output.table:q}"
        " > {log:q} 2>&1"


rule seams:
    input:
        slide=get_slide,
        tiles="results/{dataset}/seams/{slide}/tiles.parquet",
        saliency=get_seam_stores,
    output:
        without=directory("results/{dataset}/seams/{slide}/without.ome.zarr"),
        overlap=directory("results/{dataset}/seams/{slide}/with.ome.zarr"),
        table="results/{dataset}/seams/{slide}/seams.csv",
    params:
        mpp=slide_mpp,
        settings=lambda wildcards: cli_args({k: config["heatmaps"][k] for k in ("tissue_mpp", "ngff")}),
        version=VERSION,
    log:
        "results/logs/seams/{dataset}/{slide}/seams.log",
    benchmark:
        "results/benchmarks/seams/{dataset}/{slide}/seams.tsv"
    resources:
        mem_mb=8000,
        runtime=60,
    threads: 1
    conda:
        "../../envs/smoothsal.yaml"
    shell:
        "smoothsal seams {input.slide:q} --saliency {input.saliency:q} --tiles {input.tiles:q} {params.mpp}"
        " {params.settings} --without {output.without:q} --with {output.overlap:q} --table {output.table:q}"
        " > {log:q} 2>&1"
