"""The bottom layer: project tokens (issue, verify, JWKS, refresh), role and scope names, $BEAMHUB_HOME.

Imports nothing else of beamhub and no JupyterHub, so the DSN, Dask workers and widgets can verify
tokens without importing the hub.
"""
