"""Training core: data and partitions in, one run's results out.

`data` (datasets as preloaded tensors), `partition` (client splits), `models`, `state` (model
state arithmetic), `training` (local SGD, evaluation, sample-gradient counts), `algorithm` (the
hooks), `masked` and `regularizers` (helpers algorithms share), `registry` (algorithms by name,
plugins), `engine` (the one round loop), `metrics` (accuracy figures of one evaluation).
Nothing here reads or writes files except the dataset loader and the partition cache.
"""
