"""Small pieces every layer may use, which import nothing else of rlvr's: config fields with one-line help,
YAML layers, overrides and validation (``options.py``), every cross-rank collective rlvr issues
(``collectives.py``), device-side metrics read once per logging step (``device_metrics.py``) and the configs
shipped in the package, found by name (``packaged.py``). The bottom layer.
"""
