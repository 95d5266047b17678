"""servoloop: the CLI and the settings tree."""

__version__ = "0.1.0"
