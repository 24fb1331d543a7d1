"""The `sae-ray` command (`main`): sweep, run, report, train-sae (`train_sae`), and the
checks that refuse bad input before Ray starts (`preflight`)."""
