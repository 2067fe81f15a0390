"""The configuration: its models, the environment overlay and the checks run at load."""
