"""Cost-efficient BERT pretraining: raw text to a fine-tuned BERT, one stage at a time."""

__version__ = "0.1.0"
