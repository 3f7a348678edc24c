"""A beamtime as one declarative unit: plan (check, list the steps), apply, the analysis job."""
