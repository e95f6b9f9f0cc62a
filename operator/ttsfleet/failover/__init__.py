"""Regions: health and quorum, failback, traffic priorities, capacity and residency.

Everything here but `envoy`'s file writing is pure: functions of observed state and
`now`. The operator feeds them real probes and its peers' views; `envoy` turns the
result into the xDS files a region's Envoy reads (docs/regions.md).
"""
