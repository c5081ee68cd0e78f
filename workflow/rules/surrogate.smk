"""Bilinear surrogate training on the train split's tiles: one job per dataset, a torchrun worker per GPU."""


rule train_surrogate:
    input:
        tiles=get_train_tiles,
        model=get_model,
        code=get_model_code,
    output:
        surrogate="results/{dataset}/surrogate.pt",
        losses="results/{dataset}/surrogate.losses.csv",
    params:
        settings=surrogate_settings,
        checkpoint=lambda wildcards, input: optional("--checkpoint", input.model),
        version=VERSION,
    log:
        "results/logs/train_surrogate/{dataset}.log",
    benchmark:
        "results/benchmarks/train_surrogate/{dataset}.tsv"
    resources:
        mem_mb=16000,
        runtime=720,
        gpu=0,
    threads: threads_up_to(4)
    conda:
        "../../envs/smoothsal.yaml"
    shell:
        # gpu=N → N workers (nccl); no GPU (gpu=0, local runs) → one CPU worker. The loss CSV goes to its
        # default path (= output.losses): torchrun's parser would take `--log` for an abbreviation of its own.
        "torchrun --standalone --nproc_per_node $(( {resources.gpu} > 0 ? {resources.gpu} : 1 ))"
        " --no-python smoothsal train-surrogate {params.settings} {params.checkpoint} --tiles {input.tiles:q}"
        " --no-progress --out {output.surrogate:q} > {log:q} 2>&1"
