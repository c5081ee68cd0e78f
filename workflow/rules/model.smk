"""The model: given as a checkpoint, or (datasets with model.train, the demo) trained on the train split."""


rule train_model:
    input:
        tiles=get_train_tiles,
        annotations=get_train_annotations,
        code=get_model_code,
    output:
        "results/{dataset}/model.pt",
    params:
        settings=train_model_settings,
        annotations=lambda wildcards, input: optional("--annotations", input.annotations),
        version=VERSION,
    log:
        "results/logs/train_model/{dataset}.log",
    benchmark:
        "results/benchmarks/train_model/{dataset}.tsv"
    resources:
        mem_mb=16000,
        runtime=240,
        gpu=0,
    threads: threads_up_to(4)
    conda:
        "../../envs/smoothsal.yaml"
    shell:
        "smoothsal train-model {params.settings} --tiles {input.tiles:q} {params.annotations}"
        " --no-progress --out {output:q} > {log:q} 2>&1"
