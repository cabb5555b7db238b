"""Arguments shared by several ``icmf`` commands."""

from __future__ import annotations

import argparse
import os


def add_catalog_arg(parser: argparse.ArgumentParser) -> None:
    """``--catalog URI``, defaulting to ``$ICMF_CATALOG``."""
    parser.add_argument(
        "--catalog",
        default=os.environ.get("ICMF_CATALOG"),
        required="ICMF_CATALOG" not in os.environ,
        metavar="URI",
        help="catalog location: a directory or s3://, gs://, ... URI (default: $ICMF_CATALOG)",
    )
