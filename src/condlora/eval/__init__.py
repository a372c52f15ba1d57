"""Evaluation: image grids and archives, and a reference MNIST classifier for sample quality."""
