"""udp-encap-tun: TCP inside UDP through a tun device."""

__version__ = "0.1.0"
