"""The gateway pipeline: the stages in order, and the stages that belong to no other part (the
run-start rate limit, the stream limit)."""
