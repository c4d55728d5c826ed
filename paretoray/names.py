"""Names shared by the writers of a sweep's records (orchestrator/) and their readers (dashboards/).

One module both import, so that neither package imports the other's internals: the keys under
which a sweep keeps its spec and parent run in the Optuna study, and the file and tag names of
its MLflow runs.
"""

# Optuna study user attributes
SPEC_ATTR = "paretoray.spec"  # the validated spec as JSON
SPEC_TEXT_ATTR = "paretoray.spec_text"  # the YAML as written
OBJECTIVES_ATTR = "paretoray.objectives"  # objective names in Optuna's order
PARENT_ATTR = "paretoray.mlflow_parent_run_id"  # set last: a study without it is a half-created sweep

# MLflow runs: tags and artifact files
TRIAL_TAG = "paretoray.trial"
SWEEP_TAG = "paretoray.sweep"
ROLE_TAG = "paretoray.role"  # "sweep" (the parent) or "trial"
RECORD_FILE = "trial.json"
SAMPLES_FILE = "samples.parquet"
REPORT_FILE = "report.html"
