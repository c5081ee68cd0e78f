"""smoothsal: smooth hidden-layer saliency maps for whole-slide images (Smooth Deep Saliency).

slides ─tiles─▶ tile tables ─train_surrogate─▶ surrogate ─saliency (per slide × method)─▶ maps + tables
       ─heatmaps (per slide)─▶ OME-Zarr containers ─report─▶ results/report/
Configuration: config.yaml (read and checked in workflow/rules/common.smk against
workflow/schemas/config.schema.yaml and the installed smoothsal's registries). Profiles:
--workflow-profile workflow/profiles/default (local) or workflow/profiles/slurm.
"""

from snakemake.utils import min_version

min_version("9.0")


include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/tiles.smk"
include: "workflow/rules/model.smk"
include: "workflow/rules/surrogate.smk"
include: "workflow/rules/saliency.smk"
include: "workflow/rules/heatmaps.smk"
include: "workflow/rules/seams.smk"
include: "workflow/rules/report.smk"


localrules:
    all,


rule all:
    input:
        get_final_outputs(),
    default_target: True
