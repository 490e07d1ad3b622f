"""BERT construction, the sparse MLM objective, and (later) gates and pruning."""
