"""Test plugins written as a third party would: they import only `actserve.interventions.base` and are
found through the `actserve.interventions` entry-point group (scripts/setup.sh installs their metadata
into .venv/test-plugins, which only the test suite puts on sys.path: see tests/conftest.py)."""
