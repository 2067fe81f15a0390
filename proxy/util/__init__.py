"""Small helpers shared by every part: time, a bounded cache, single flight, backoff, secret files."""
