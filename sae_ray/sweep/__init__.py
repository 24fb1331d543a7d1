"""Many trials: the search space (`space`), the Tuner with its objectives and constraints
(`tuner`), the cluster it runs on (`cluster`), results.csv / best.json / the Optuna study
(`results`), the paired comparison over seeds (`comparison`), the live console table
(`progress`), the HTML report (`report`, `figures`) and W&B runs (`wandb_log`)."""
