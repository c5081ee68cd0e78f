"""The paper's tables (TV, prediction difference, accuracy) and figures over every slide: one job."""


rule report:
    input:
        tables=get_report_tables,
        heatmaps=get_report_heatmaps,
    output:
        directory("results/report"),
    params:
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
        "smoothsal report --tables {input.tables:q} --heatmaps {input.heatmaps:q} --out {output:q}"
        " > {log:q} 2>&1"
