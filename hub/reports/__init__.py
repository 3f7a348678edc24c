"""Reports for admins: service levels (`beamhub report sla`) and node-hours (`report allocation`)."""
