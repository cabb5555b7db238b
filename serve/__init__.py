"""ICM-Fusion serving: a Ray Serve application that hosts a base model and swaps fused LoRA
adapters in per request (see docs/design.md §6). Inside this project, Ray Serve itself is always
imported as ``from ray import serve``."""
