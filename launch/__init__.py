"""The `jaxalign` command line, the experiment registry and config overrides."""
