"""Datasets: real loaders for the paper's datasets, embedded datasets, derived noisy splits."""
