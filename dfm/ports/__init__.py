"""Ports: the interfaces through which the core talks to the world (typing.Protocol), and the value
types that cross them. Implementations live in ``dfm.adapters``; ``dfm.app.bootstrap`` wires them."""
