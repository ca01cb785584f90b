"""SMTP AUTH (RFC 4954): the auth plugins, each checking credentials through twisted.cred.

- C{auth/flat_file}: users and plain passwords in C{auth_flat_file.ini};
- C{auth/auth_proxy}: asks the remote SMTP server of the user's domain (C{auth_proxy.ini});
- C{auth/auth_bridge}: asks one remote SMTP server (C{smtp_bridge.ini}) and keeps the
  credentials so a queue plugin can relay through it with them.

What they share (the AUTH exchange, the EHLO keyword, the failure delay, constrain_sender)
is L{haraka_tw.plugins.auth.auth_base.AuthPlugin}; the mechanisms' wire formats are in
L{haraka_tw.plugins.auth.sasl}. Load one auth plugin per server: the first one in the
plugins file answers every AUTH command.
"""
