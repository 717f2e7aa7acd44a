"""Features: point operations, the point transformer and ViT backbones, their weights, PFA and the extractor."""
