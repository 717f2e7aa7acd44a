"""Detection: the method's detector, decision layer fusion, pass/fail thresholds and fitted-model files."""
