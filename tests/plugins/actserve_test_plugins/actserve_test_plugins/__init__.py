"""Test plugins written as a third party would: they import only `actserve.interventions.base` and are
found through the `actserve.interventions` entry-point group (installed by scripts/setup.sh)."""
