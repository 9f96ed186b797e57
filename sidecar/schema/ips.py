"""IPs in the scripts' form: 32 hex digits (IPv4 mapped into IPv6), networks as 'hex/bits'.

The data plane encodes the client IP, the control plane a key's allowed networks:
one encoding for both.
"""

from __future__ import annotations

import ipaddress
from functools import lru_cache


@lru_cache(maxsize=65536)
def ip_hex(ip: str) -> str:
    """32 hex digits of the address, IPv4 mapped into IPv6 (::ffff:a.b.c.d); '' if invalid."""
    try:
        addr = ipaddress.ip_address(ip.strip().split("%", 1)[0])
    except ValueError:
        return ""
    if isinstance(addr, ipaddress.IPv4Address):
        return "00000000000000000000ffff" + addr.packed.hex()
    if addr.ipv4_mapped is not None:
        return "00000000000000000000ffff" + addr.ipv4_mapped.packed.hex()
    return addr.packed.hex()


def network_entry(cidr: str) -> str:
    """A key's allowed IP or CIDR in the script's form 'hex/bits'. Raises ValueError."""
    net = ipaddress.ip_network(cidr.strip(), strict=False)
    bits = net.prefixlen + (96 if net.version == 4 else 0)
    return f"{ip_hex(str(net.network_address))}/{bits}"
