"""``icmf`` command line: thin commands that parse, validate and call the library."""
