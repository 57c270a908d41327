"""Metrics torchmetrics lacks (kNN and linear-probe evaluation arrive with the self-supervised recipes).

Classification accuracy uses torchmetrics directly (see vitlab/heads/classification.py).
"""
