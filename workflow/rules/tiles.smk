"""Tissue mask, tile grid and labels: one job per slide."""


rule tiles:
    input:
        slide=get_slide,
        annotation=get_annotation,
    output:
        table="results/{dataset}/tiles/{slide}.parquet",
        overview="results/{dataset}/tiles/{slide}.png",
    params:
        settings=tiles_settings,
        mpp=slide_mpp,
        fingerprint=slide_fingerprint,
        annotation=lambda wildcards, input: optional("--annotations", input.annotation),
        version=VERSION,
    log:
        "results/logs/tiles/{dataset}/{slide}.log",
    benchmark:
        "results/benchmarks/tiles/{dataset}/{slide}.tsv"
    resources:
        mem_mb=4000,
        runtime=60,
    threads: 1
    conda:
        "../../envs/smoothsal.yaml"
    shell:
        "smoothsal tiles {input.slide:q} --slide-id {wildcards.slide:q} {params.annotation} {params.mpp}"
        " {params.settings} --out {output.table:q} --overview {output.overview:q} > {log:q} 2>&1"
