//! The client's address: the TCP peer, or, behind a trusted proxy, the right-most
//! `X-Forwarded-For` hop that is not itself a trusted proxy.
//!
//! Every per-address limit (registrations, code guesses, sockets, upgrades) and the
//! `remote_addr` shown to a room's members come from here. A header is believed only from a
//! configured proxy (`--trusted-proxies`): anyone else could write any value into it. Each
//! trusted proxy appends the address it saw, so reading right to left and skipping trusted
//! hops finds the first address no trusted party vouches beyond; an unparsable hop ends the walk
//! (what lies left of it is the client's own claim).

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use ipnet::IpNet;

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, as a dual-stack socket reports IPv4 peers)
/// as the IPv4 address it is, so limits and proxy lists see one form.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// The key of per-address limits: the address itself, but an IPv6 address's /64 (one host
/// usually holds a whole /64, so per-/128 limits would give it 2^64 budgets).
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match canonical(ip) {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// Whether `ip` is one of the configured proxies.
pub fn trusted(ip: IpAddr, proxies: &[IpNet]) -> bool {
    proxies.iter().any(|net| net.contains(&ip))
}

/// The address of the client behind `peer` (see module docs).
pub fn client_ip(headers: &HeaderMap, peer: SocketAddr, proxies: &[IpNet]) -> IpAddr {
    let mut client = canonical(peer.ip());
    if !trusted(client, proxies) {
        return client;
    }
    // Every header line, in order; hops within a line are comma-separated.
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.parse::<IpAddr>().map(canonical) else {
            break;
        };
        client = ip;
        if !trusted(ip, proxies) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append("x-forwarded-for", l.parse().unwrap());
        }
        h
    }

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    const PEER: &str = "10.0.0.5:4000";

    #[test]
    fn untrusted_peer_header_is_ignored() {
        let h = headers(&["6.6.6.6"]);
        let ip = client_ip(&h, PEER.parse().unwrap(), &[]);
        assert_eq!(ip, "10.0.0.5".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn right_most_untrusted_hop_wins() {
        let proxies = nets(&["10.0.0.0/8"]);
        // The client forged "1.1.1.1"; the ALB appended the real 2.2.2.2, then an internal hop.
        let h = headers(&["1.1.1.1, 2.2.2.2", "10.0.0.9"]);
        let ip = client_ip(&h, PEER.parse().unwrap(), &proxies);
        assert_eq!(ip, "2.2.2.2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn garbage_hop_stops_the_walk() {
        let proxies = nets(&["10.0.0.0/8"]);
        let h = headers(&["<script>, 10.0.0.7"]);
        let ip = client_ip(&h, PEER.parse().unwrap(), &proxies);
        assert_eq!(ip, "10.0.0.7".parse::<IpAddr>().unwrap());
        let none = client_ip(&HeaderMap::new(), PEER.parse().unwrap(), &proxies);
        assert_eq!(none, "10.0.0.5".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn limits_key_ipv6_by_its_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(limit_key(a), limit_key(b));
        assert_ne!(limit_key(a), limit_key(c));
        let v4: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(limit_key(v4), v4);
    }

    #[test]
    fn mapped_ipv6_is_ipv4() {
        let peer: SocketAddr = "[::ffff:127.0.0.1]:80".parse().unwrap();
        let ip = client_ip(&HeaderMap::new(), peer, &nets(&["127.0.0.1/32"]));
        assert_eq!(ip, "127.0.0.1".parse::<IpAddr>().unwrap());
    }
}
