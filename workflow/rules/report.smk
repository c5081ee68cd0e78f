"""The paper's tables (TV, prediction difference, accuracy) and figures over every slide: one job."""


rule report:
    input:
        tables=get_report_tables,
        heatmaps=get_report_heatmaps,
        seams=get_report_seams,
    output:
        index="results/report/index.html",
        tables=report(
            directory("results/report/tables"),
            patterns=["{name}.csv"],
            caption="../report/tables.rst",
            category="Tables",
        ),
        tv=report(
            directory("results/report/figures/tv_per_layer"),
            patterns=["{name}.png"],
            caption="../report/tv_per_layer.rst",
            category="Figures",
            subcategory="TV per layer",
        ),
        overview=report(
            directory("results/report/figures/overview"),
            patterns=["{name}.png"],
            caption="../report/overview.rst",
            category="Figures",
            subcategory="Slide overviews",
        ),
        seams=report(
            directory("results/report/figures/seams"),
            patterns=["{name}.png"],
            caption="../report/seams.rst",
            category="Figures",
            subcategory="Seams",
        ),
    params:
        seams=lambda wildcards, input: optional("--seams", input.seams),
        version=VERSION,
    log:
        "results/logs/report.log",
    benchmark:
        "results/benchmarks/report.tsv"
    resources:
        mem_mb=8000,
        runtime=60,
    threads: 1
    conda:
        "../../envs/smoothsal.yaml"
    shell:
        "smoothsal report --tables {input.tables:q} --heatmaps {input.heatmaps:q} {params.seams}"
        " --out results/report"
        " > {log:q} 2>&1"
