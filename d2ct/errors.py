"""Errors d2ct raises for bad input. Messages name the file, column or option at fault."""


class D2CTError(Exception):
    """Base class of d2ct's own errors: the command-line tools print them without a traceback."""


class DataError(D2CTError, ValueError):
    """Input data that cannot be used as it is (missing file, bad CSV column, wrong size...)."""


class ConfigError(D2CTError, ValueError):
    """An option or config value that is invalid or inconsistent."""


class WeightsUnavailableError(D2CTError, RuntimeError):
    """Pretrained weights named by MODEL.WEIGHTS cannot be fetched or found."""
