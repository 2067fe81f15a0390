"""What the ARP standard defines and every stage speaks: the route table, the ErrorEnvelope
answers, the run-start checks, and the packaged schemas."""
