"""The load generator behind load_test.py: requests and results as data (client.py), metric maths as pure functions (stats.py)."""
