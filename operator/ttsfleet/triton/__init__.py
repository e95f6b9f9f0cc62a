"""Triton: the serving contract and the model configurations."""
