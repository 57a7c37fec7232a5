"""The networks and their parts: encoder, decoders, masking, targets and losses, teachers (incl. EMA), FLOPs."""
