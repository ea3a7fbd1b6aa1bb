"""Tasks, ablation runner and benchmarks (installed as memplug.experiments)."""
