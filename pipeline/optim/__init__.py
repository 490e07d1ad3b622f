"""Optimizers and learning-rate schedules (pure torch; DeepSpeed is only touched in pipeline.engine)."""
