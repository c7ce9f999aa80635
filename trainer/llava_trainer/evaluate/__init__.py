"""MMMU evaluation with the official protocol (`llava-trainer evaluate`).

Pure parts (no torch): `data` reads the MMMU parquet files, `prompts` builds the official prompts,
`parse` and `score` re-implement the official answer parsing and accuracy. `generate` holds the
model I/O (transformers, torch.distributed); `run` is the stage command. See docs/EVALUATION.md.
"""
