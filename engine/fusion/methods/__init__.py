"""Built-in fusion methods; importing this package registers them."""

from engine.fusion.icm import method as icm  # noqa: F401
from engine.fusion.methods import (  # noqa: F401
    cat,
    core_space,
    iso,
    knots,
    linear,
    lorahub,
    pruning,
    regmean,
    star,
    task_arithmetic,
    tsv,
)
