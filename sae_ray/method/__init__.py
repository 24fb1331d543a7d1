"""SAE-ception itself: one trial's cycles (`cycle`), fine-tuning with the auxiliary loss
(`finetune`), sharpened targets by example id (`targets`), and evaluation (`evaluate`)."""
