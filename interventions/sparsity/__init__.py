"""Activation sparsity (issue 14): the plugin, its calibration artifact, the calibration tool."""
