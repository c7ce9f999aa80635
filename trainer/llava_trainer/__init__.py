"""llava-trainer: the LLaVA-1.5 stages (prepare, pretrain, finetune, evaluate)."""
