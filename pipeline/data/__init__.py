"""Corpus readers, tokenizer, packing, shard files, and the training data loader."""
