"""Sparse autoencoders: the model (`model`) and its architectures (`archs`, one file each),
its training step, loss and dead-latent state (`training`), the batches it learns from
(`feeds`: stored activations; `spliced`: end to end through a frozen model), checkpoints in
sparsify's layout (`checkpoints`), and the Ray Train run that ties them together
(`trainer`). Reads activations; knows no sweep."""
