"""Chain-of-thought compression (ASC, DESIGN.md §8): the plugin, its artifact, and the build pipeline."""
