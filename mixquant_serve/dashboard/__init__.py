"""The built-in dashboard: GET /dashboard and its JSON, fed by a cluster-wide metrics collector (collector.py)."""
