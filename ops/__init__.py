"""Operator tools: the cluster's state as one snapshot (with scheduling reasons), its tables and live view, engine metrics from the nodes, and checks of a Serve config before `serve deploy`."""
