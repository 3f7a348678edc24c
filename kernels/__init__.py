"""Reserved compute nodes: QoS tiers, preemption, beamtime reservations, scheduler backends."""
