
from zope.interface import implementer
from haraka_tw.codes import OK
from haraka_tw.interfaces import IMailHook, IRegistration

@implementer(IMailHook, IRegistration)
class Factory:
    def register(self, context):
        self.context = context
        context.set_priority("mail", -5)
        context.server_notes["registered"] = context.name
    def hook_mail(self, connection, sender, params):
        return OK

class NoHooks:
    pass

class Explodes:
    def __init__(self):
        raise RuntimeError("cannot start")
