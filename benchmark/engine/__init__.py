"""Engine: datasets, models, the one training loop (single and packed) and the sparsity metrics; knows no method by name."""
