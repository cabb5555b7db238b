"""Built-in fusion methods; importing this package registers them."""

from engine.fusion.methods import cat, icm, linear, lorahub, pruning, task_arithmetic  # noqa: F401
