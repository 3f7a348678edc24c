"""JupyterHub side of beamhub: tokens, authenticator, API gateway, enclave profiles, the CLI."""
