"""`medxfer study`: the transfer-learning experiment, arms over weights × strategy × backbone × dims × data × seeds.

Modules: `spec` (the study file, validated before torch or mlflow load), `runner` (ingest once,
train every arm at every lr of the grid, select on validation, evaluate the selected run once,
MLflow parent and child runs, resume), `results` (the per-arm table, paired comparisons with the
reference arm, study.json, study.html and the console table). Only `spec` is imported here.
"""

from pipeline.study.spec import AXES, Arm, Study, load_study

__all__ = ["AXES", "Arm", "Study", "load_study"]
