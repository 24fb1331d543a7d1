"""Side-by-side ratio benchmarks: each prints one JSON line per figure."""
