"""A per-user warm server for ``corral run`` (issue 11): :mod:`.client` is what
every ``corral`` runs first (standard library only), :mod:`.server` the
server and its ``corral warm`` commands."""
