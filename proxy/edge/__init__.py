"""The public edge: client connections on llhttp, their requests and answers, flow control, the
deadline sweep and the accepting listener."""
