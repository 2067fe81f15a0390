"""The process: start-up and shutdown, the command line, the ops listener, the coordinator health probe."""
