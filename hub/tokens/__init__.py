"""The token service (a JupyterHub service): the one process that holds the signing key and mints."""
