"""Storage: the run folder's paths, atomic files, TensorBoard event files, the parquet sink, run.json."""
