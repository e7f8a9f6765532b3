"""Speed: measured ratios (perf), the dry-run cost estimate, and the GPU check."""
