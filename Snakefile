"""smoothsal: smooth hidden-layer saliency maps for whole-slide images (Smooth Deep Saliency).

slides ─tiles─▶ tile tables ─train_surrogate─▶ surrogate ─saliency (per slide × method)─▶ maps + tables
       ─heatmaps (per slide)─▶ OME-Zarr containers ─report─▶ results/report/
Configuration: config.yaml (validated by workflow/schemas/config.schema.yaml). Profiles:
--workflow-profile workflow/profiles/default (local) or workflow/profiles/slurm.
"""

from snakemake.utils import min_version

min_version("9.0")


configfile: "config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/tiles.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/surrogate.smk"
include: "workflow/rules/saliency.smk"
include: "workflow/rules/heatmaps.smk"
include: "workflow/rules/report.smk"


localrules:
    all,


rule all:
    input:
        get_final_outputs(),
    default_target: True
