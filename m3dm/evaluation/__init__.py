"""Evaluation: metrics, result tables, pictures, and one class's results with the files written from them."""
