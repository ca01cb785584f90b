from twisted.application.service import ServiceMaker

haraka = ServiceMaker(
    "haraka_tw", "haraka_tw.tap", "A Haraka-style ESMTP server with hook plugins.", "haraka"
)
