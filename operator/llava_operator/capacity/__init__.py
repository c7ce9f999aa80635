"""Capacity planning: memory per device and time of each training stage, before launching.

`geometry` (model sizes), `lengths` (token lengths), `memory` and `timing` are plain Python (no
torch, no pydantic; bench/gpu_check.sh uses them on a bare GPU machine); `planner` applies them to
a LlavaRun spec (`capacity_plan`, pure); `inputs`, `text` and `cli` are `llavarun plan`'s edges.
"""
