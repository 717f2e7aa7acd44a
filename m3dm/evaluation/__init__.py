"""Evaluation: metrics, result tables and pictures."""
