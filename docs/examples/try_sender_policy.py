"""The client side of docs/tutorial.md: one SMTP session, printing every reply.

Run it while ``twistd -n haraka --config config`` is running: ``python try_sender_policy.py``
(or give another port as the first argument).
"""

from __future__ import annotations

import smtplib
import sys


def session(port: int = 2525) -> list[tuple[int, bytes]]:
    """Try each kind of sender, then send one message; return the replies in order."""
    replies = []
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        replies.append(client.ehlo("client.test"))
        replies.append(client.mail("spammer@bad.example"))  # in sender_blocklist
        replies.append(client.mail("alice@slow.example"))  # in defer_domains
        replies.append(client.mail("bob@good.example"))  # neither: other plugins decide
        replies.append(client.rcpt("carol@example.com"))  # example.com is in host_list
        replies.append(client.rcpt("dave@elsewhere.example"))  # not in host_list
        replies.append(client.data(b"Subject: hello\r\n\r\nHi Carol.\r\n"))
    return replies


if __name__ == "__main__":
    for reply in session(int(sys.argv[1]) if len(sys.argv) > 1 else 2525):
        print(reply)
