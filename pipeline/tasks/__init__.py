"""Fine-tuning tasks: data, metrics, SQuAD windows, models."""
