"""Built-in fusion methods; importing this package registers them."""

from engine.fusion.methods import (  # noqa: F401
    cat,
    core_space,
    icm,
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
