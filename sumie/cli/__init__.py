"""The ``sumie`` command line: sub-commands that drive the library (engine, training, measurements)."""
