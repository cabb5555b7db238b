"""Fusion-quality harness: score every fusion method on the lab's suites (see fusion_quality.py)."""
