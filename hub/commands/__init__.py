"""One module per `beamhub` subcommand; each exposes ``register(subparsers)``."""
