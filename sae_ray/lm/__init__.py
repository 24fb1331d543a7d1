"""The transformer side: labelled text split by example id (`text_data`), models, presets
and the block hook (`models`), batching (`batching`), and hooked activations written as
Parquet shards (`extraction`). Knows nothing of SAEs or sweeps."""
