"""Built-in plugins, one module each, named as Haraka names them.

C{queue/maildir} in the plugins file is the module C{haraka_tw.plugins.queue.maildir}; each
module's C{Plugin} is its factory.
"""
