"""Do the stored maps explain the original model? Deletion/insertion, randomisation and relevance mass on a
sample of tiles: one job per eval slide and method, after that slide's saliency job (config faithfulness)."""


rule faithfulness:
    input:
        slide=get_slide,
        tiles="results/{dataset}/tiles/{slide}.parquet",
        store="results/{dataset}/saliency/{slide}/{method}.zarr",
        model=get_model,
        code=get_model_code,
        surrogate=get_surrogate,
        annotation=get_annotation,
    output:
        table="results/{dataset}/faithfulness/{slide}/{method}.parquet",
        randomisation="results/{dataset}/faithfulness/{slide}/{method}.randomisation.parquet",
    params:
        settings=faithfulness_settings,
        checkpoint=lambda wildcards, input: optional("--checkpoint", input.model),
        surrogate=lambda wildcards, input: optional("--surrogate", input.surrogate),
        annotation=lambda wildcards, input: optional("--annotations", input.annotation),
        version=VERSION,
        run=faithfulness_run_options,
    log:
        "results/logs/faithfulness/{dataset}/{slide}/{method}.log",
    benchmark:
        "results/benchmarks/faithfulness/{dataset}/{slide}/{method}.tsv"
    resources:
        mem_mb=8000,
        runtime=60,
        gpu=0,
    threads: threads_up_to(2)
    conda:
        "../../envs/smoothsal.yaml"
    shell:
        "smoothsal faithfulness {input.slide:q} --tiles {input.tiles:q} --saliency {input.store:q}"
        " --method {wildcards.method} {params.settings} {params.checkpoint} {params.surrogate}"
        " {params.annotation} --dataset {wildcards.dataset:q} {params.run}"
        " --out {output.table:q} --randomisation-out {output.randomisation:q} > {log:q} 2>&1"
