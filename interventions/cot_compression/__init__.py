"""Chain-of-thought compression (ASC, docs/architecture.md §10): the plugin, its artifact, the build
pipeline."""
