"""Training a preset shape into a checkpoint whose logits look like a trained model's (qwenlab tiny --train-steps)."""
