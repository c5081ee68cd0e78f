"""Saliency maps of every tile at every layer × attribution: one job per slide and smoothing method."""


rule saliency:
    input:
        slide=get_slide,
        tiles="results/{dataset}/tiles/{slide}.parquet",
        model=get_model,
        code=get_model_code,
        surrogate=get_surrogate,
    output:
        store=directory("results/{dataset}/saliency/{slide}/{method}.zarr"),
        table="results/{dataset}/saliency/{slide}/{method}.parquet",
    params:
        settings=saliency_settings,
        checkpoint=lambda wildcards, input: optional("--checkpoint", input.model),
        surrogate=lambda wildcards, input: optional("--surrogate", input.surrogate),
        version=VERSION,
        run=lambda wildcards, threads: saliency_run_options(threads),
    log:
        "results/logs/saliency/{dataset}/{slide}/{method}.log",
    benchmark:
        "results/benchmarks/saliency/{dataset}/{slide}/{method}.tsv"
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
