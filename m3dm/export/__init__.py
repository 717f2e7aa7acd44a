"""Export of a fitted class model to one ONNX file scored by the light runner ``m3dm_runner`` (docs/deployment.md).

``graph``: the detector and its backbones as one traceable module; ``blur``: the reference's Pillow blur in
integer arithmetic; ``onnx``: tracing and the artefact's metadata; ``cli``: the command line.
"""
