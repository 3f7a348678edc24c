"""`beamhub up`: one deployment file, the stack it starts (IdP, hub, services, DSN, detector)."""
