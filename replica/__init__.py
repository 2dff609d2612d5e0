"""What runs inside the Serve replicas: shipped to every node through Ray's runtime_env, and its files alone make the deployment version."""
