"""The base of every error saelora raises for bad input; the CLI prints these without a traceback."""


class SaeloraError(Exception):
    """Bad input or an unusable artifact; the message says what is wrong and what to do."""


class ConfigError(SaeloraError, ValueError):
    """A configuration value that is out of range or inconsistent."""
