"""Applications: the command lines, the run of the classes, prediction on new parts, the demo and processes."""
