"""jarvisd: the state daemon of the Jarvis assistant platform."""

# The one place the version is written: pyproject.toml reads it from here
# (looking it up in the installed metadata costs the daemon's start 0.1 s).
__version__ = "0.1.0"

__all__ = ["__version__"]
