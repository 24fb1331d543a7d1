"""Many trials: the search space and Tuner (`tuner`), the objectives' rules (`objectives`),
results.csv / best.json / the Optuna study (`results`), the live console table
(`progress`), the HTML report (`report`) and W&B runs (`wandb_log`)."""
