"""SAE-ception's science: fine-tuning with the auxiliary loss (`finetune`), sharpened
targets by example id (`targets`), evaluation (`evaluate`, `evaluate_lm`), the causal-LM
mode (`cpt`), interventions (`intervene`) and the seeds' random streams (`seeds`). A trial's
orchestration of them is `sae_ray.trial`."""
