"""Training: the generic pair loss (`training.losses`), Metrix mixing (`training.metrix`), the
objective that combines them (`training.objective`) and the training loop.

Import-light on purpose: importing `training` does not import torch; import the submodules.
"""
