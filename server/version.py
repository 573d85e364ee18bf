"""The package version, read from installed metadata so pyproject.toml stays the one source."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("actserve")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0+source"
