"""The ``sumie`` command line: sub-commands that drive the library (engine, training, measurements)."""


def finite_number(flag: str, text: str) -> float:
    """A command-line value as a finite float, or a ConfigError naming the flag."""
    import math

    from sumie.errors import ConfigError

    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: not a number") from None
    if not math.isfinite(value):
        raise ConfigError(f"{flag} {text!r}: must be a finite number")
    return value
