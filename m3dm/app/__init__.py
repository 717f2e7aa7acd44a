"""Applications: the command lines, the per-class run, prediction on new parts, the demo and processes."""
