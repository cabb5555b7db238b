"""ICM-Fusion's one home: everything the ``icm`` method decides (docs/design.md §2.3, §2.6–2.7).

- :mod:`~engine.fusion.icm.method`: the ``icm`` fusion method and its parameters, the
  familiarity gate and few-shot latent refinement.
- :mod:`~engine.fusion.icm.inputs`: the per-input half (canonical form, condition, encoding,
  decode of ``mu``, exact factors) and the cache that reuses it across fusions.
- :mod:`~engine.fusion.icm.latent`: the latent-space fusion rule, the anchored decode and the
  familiarity of an input (pure torch; meta-training's fusion loss uses the same rules).
- :mod:`~engine.fusion.icm.projection`: the adapter-derived task vector, the condition of a task
  without in-context examples.

Importing :mod:`engine.fusion.methods` registers the method.
"""
