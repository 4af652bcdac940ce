"""Which hosts and addresses an image URL may reach: the allowlist and the public-address rule (pure checks)."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# The well-known NAT64 prefix (RFC 6052) carries an IPv4 address in its last 32 bits.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
# A last label that is a number is an IPv4 address to a URL parser (WHATWG) and to inet_aton
# ("0x7f000001", "2130706433"): such hosts must be written as a.b.c.d, so they are checked as IPs.
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")


def address_allowed(address: str | IPAddress, allowed_networks: Iterable[IPNetwork] = ()) -> bool:
    """Say whether an address is public, or inside one of the operator's allowed networks."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    embedded = _embedded_ipv4(ip)
    for network in allowed_networks:
        if ip in network or (embedded is not None and embedded in network):
            return True
    return _is_public(ip)


def _embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """Return the IPv4 address an IPv6 form carries (mapped, 6to4, NAT64), if any."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _is_public(ip: IPAddress) -> bool:
    """Say whether an address is globally routable and not special in any way."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return _is_public(ip.ipv4_mapped)  # the socket talks to the IPv4 address
    embedded = _embedded_ipv4(ip)
    if embedded is not None and not _is_public(embedded):
        return False
    # is_global alone lets multicast (224.0.0.0/4) through, hence the explicit flags.
    special = (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
               or ip.is_unspecified or (isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local))
    return ip.is_global and not special


def normalize_host(host: str) -> str:
    """Return a host as the allowlist compares it: lowercase IDNA ASCII, or a canonical IP literal."""
    host = host.strip().removeprefix("[").removesuffix("]").lower().removesuffix(".")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError("not a valid host name") from exc
    labels = ascii_host.split(".")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise ValueError("not a valid host name")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise ValueError("write an IPv4 address in the dotted form a.b.c.d")
    return ascii_host


def host_allowed(host: str, allowed_domains: Iterable[str]) -> bool:
    """Say whether a normalised host is listed exactly, or under a ``*.example.com`` wildcard."""
    is_ip = _is_ip(host)
    for entry in allowed_domains:
        entry = entry.strip()
        try:
            if entry.startswith("*."):
                # Subdomains only, and never an IP literal: "*.0.1" must not match "127.0.0.1".
                if not is_ip and host.endswith("." + normalize_host(entry[2:])):
                    return True
            elif host == normalize_host(entry):
                return True
        except ValueError as exc:
            raise ValueError(f"VLGATE_ALLOWED_MEDIA_DOMAINS has an invalid entry {entry!r}: {exc}") from exc
    return False


def _is_ip(host: str) -> bool:
    """Say whether a host is an IP literal."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def parse_networks(cidrs: Iterable[str]) -> list[IPNetwork]:
    """Parse the operator's allowed networks; a bad entry is a configuration error (500), not the user's."""
    try:
        return [ipaddress.ip_network(cidr.strip(), strict=False) for cidr in cidrs]
    except ValueError as exc:
        raise ValueError(f"VLGATE_ALLOWED_MEDIA_NETWORKS has an invalid entry: {exc}") from exc
