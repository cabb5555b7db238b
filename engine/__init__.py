"""ICM-Fusion engine: fuse catalogs of LoRA adapters into multi-task adapters on Ray.

Public API lives in the subpackages (``engine.adapters``, ``engine.catalog``); modules whose
names start with an underscore are private.
"""

__version__ = "0.1.0"
