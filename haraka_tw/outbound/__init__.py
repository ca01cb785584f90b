"""Outbound delivery: the queue, the scheduler, MX lookup and the SMTP/LMTP client."""
