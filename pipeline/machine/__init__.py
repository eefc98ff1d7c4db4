"""The machine a stage runs on: memory, disk, processes, and how a training step fits.

- `memory`: each stage's peak memory, and a check before a model loads that it fits.
- `diskspace`: free disk, checked before a large write.
- `processes`: children that die with the pipeline; this process's rank.
- `step_plan`: how one optimizer step executes on this device (micro-batch, checkpointing, kernels).
"""
