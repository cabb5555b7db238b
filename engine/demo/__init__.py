"""The ``icmf demo`` pipeline and the tiny model and tasks it (and the tests) use."""
