"""mitmproxy addons of the egress proxy, one concern per module.

Order matters; ``execbox.egress.proxy`` installs them as::

    auth -> policy -> upstream -> secrets -> hooks -> redaction -> netlog -> gate

Every hook that decides is wrapped by ``fail_closed``: mitmproxy logs and swallows
exceptions raised by addons, so an addon that crashed would otherwise let the flow
through. ``gate`` runs last and denies any request that nobody explicitly allowed.
"""
