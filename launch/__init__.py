"""The `jaxalign` command line and the remote launchers; the experiment registry and config overrides they use are
`jaxalign.registry` and `jaxalign.overrides`."""
