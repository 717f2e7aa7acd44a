"""Unsupervised Feature Fusion: the fusion block, its contrastive loss, feature dumps and pretraining."""
