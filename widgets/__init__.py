"""Steering panel, live plots and the shared dashboard (imported only by notebooks and dashboard)."""
