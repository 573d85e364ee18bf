"""Per-request routing of mixture-of-experts models (issue 15): the `moe` plugin."""
