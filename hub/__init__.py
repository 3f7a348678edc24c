"""JupyterHub side of beamhub: authenticator, token service, API gateway, `beamhub up`, the CLI."""
