"""haraka_tw inside an existing Twisted application. Run: twistd -ny docs/examples/embed.tac

The application serves a web page listing the mail its SMTP listener accepted. The
listeners are Twisted endpoint strings, from the environment when set:

    EMBED_SMTP  default tcp:2525:interface=127.0.0.1
    EMBED_WEB   default tcp:8080:interface=127.0.0.1
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # for embed_app, and for the plugin embed_config/plugins names

from twisted.application import service  # noqa: E402

from embed_app import build  # noqa: E402

application = service.Application("inbox")
build(
    os.path.join(HERE, "embed_config"),
    smtp=os.environ.get("EMBED_SMTP", "tcp:2525:interface=127.0.0.1"),
    web=os.environ.get("EMBED_WEB", "tcp:8080:interface=127.0.0.1"),
).setServiceParent(application)
