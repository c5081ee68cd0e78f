"""The embedded demo: synthetic slides + annotations that the shipped sample sheets point at."""


rule demo_data:
    output:
        [f"{config['demo']['out']}/{ds}/{name}" for ds, names in DEMO_SLIDES.items() for name in names],
    params:
        out=lambda wildcards, output: Path(output[0]).parent.parent,
        settings=cli_args({"size": config["demo"]["size"], "seed": config["demo"]["seed"]}),
        version=VERSION,
    log:
        "results/logs/demo_data.log",
    benchmark:
        "results/benchmarks/demo_data.tsv"
    resources:
        mem_mb=3000,
        runtime=30,
    threads: 2
    conda:
        "../../envs/smoothsal.yaml"
    shell:
        "smoothsal demo-data --out {params.out:q} {params.settings} --processes {threads} --no-progress > {log:q} 2>&1"
