"""smoothsal in this repository: the workflow (workflow/Snakefile) on the embedded demo.

Configuration: config.yaml (the demo; read and checked in workflow/rules/common.smk against
workflow/schemas/config.schema.yaml and the installed smoothsal's registries). For a project of your own,
deploy the workflow as a module instead (README, "Use it in your own project"; config/config.yaml).
Profiles: --workflow-profile workflow/profiles/default (local) or workflow/profiles/slurm.
"""


include: "workflow/Snakefile"

# Snakemake keeps the default target of the main Snakefile only (an included file's is reset after the
# include): the workflow's target rule `all` is this one's too, so that `snakemake --cores all` runs it.
workflow.default_target = "all"
