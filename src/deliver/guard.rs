//! The address guard: which IP addresses a delivery may connect to.
//!
//! Only globally routable addresses, unless `security.allow_networks` lists
//! the network. IPv4-mapped, IPv4-compatible, NAT64 and 6to4 forms are judged
//! by the IPv4 address they carry. The guard is applied to the addresses DNS
//! returned and the connection uses only those (see `client.rs`), so a
//! rebinding resolver gets no second chance.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

#[derive(Debug, Clone, Default)]
pub struct Guard {
    allowed: Vec<IpNet>,
}

impl Guard {
    pub fn new(allowed: Vec<IpNet>) -> Guard {
        Guard { allowed }
    }

    /// True when a delivery may connect to `ip`.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.allowed.iter().any(|net| net.contains(&ip)) || is_global(ip)
    }
}

/// An IPv6 address that only wraps an IPv4 one, as that IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => embedded_v4(v6).map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The IPv4 address inside mapped (::ffff:a.b.c.d), compatible (::a.b.c.d),
/// NAT64 (64:ff9b::a.b.c.d) and 6to4 (2002:aabb:ccdd::) addresses.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let o = ip.octets();
    let tail = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match s {
        [0, 0, 0, 0, 0, 0xffff, _, _] => Some(tail),
        // ::/96 except :: and ::1, which are IPv6's own.
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 || lo > 1 => Some(tail),
        [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(tail),
        [0x2002, _, _, _, _, _, _, _] => Some(Ipv4Addr::new(o[2], o[3], o[4], o[5])),
        _ => None,
    }
}

/// True for addresses reachable on the public internet.
pub fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_global_v4(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => is_global_v4(v4),
            None => is_global_v6(v6),
        },
    }
}

fn is_global_v4(ip: Ipv4Addr) -> bool {
    const NOT_GLOBAL: &[(u32, u8)] = &[
        (0x0000_0000, 8),  // 0.0.0.0/8 "this network"
        (0x0a00_0000, 8),  // 10/8 private
        (0x6440_0000, 10), // 100.64/10 carrier-grade NAT
        (0x7f00_0000, 8),  // 127/8 loopback
        (0xa9fe_0000, 16), // 169.254/16 link-local, cloud metadata
        (0xac10_0000, 12), // 172.16/12 private
        (0xc000_0000, 24), // 192.0.0/24 protocol assignments
        (0xc000_0200, 24), // 192.0.2/24 documentation
        (0xc058_6300, 24), // 192.88.99/24 6to4 relay
        (0xc0a8_0000, 16), // 192.168/16 private
        (0xc612_0000, 15), // 198.18/15 benchmarking
        (0xc633_6400, 24), // 198.51.100/24 documentation
        (0xcb00_7100, 24), // 203.0.113/24 documentation
        (0xe000_0000, 4),  // 224/4 multicast
        (0xf000_0000, 4),  // 240/4 reserved, broadcast
    ];
    let n = u32::from(ip);
    !NOT_GLOBAL
        .iter()
        .any(|&(net, len)| n >> (32 - u32::from(len)) == net >> (32 - u32::from(len)))
}

fn is_global_v6(ip: Ipv6Addr) -> bool {
    const NOT_GLOBAL: &[(u128, u8)] = &[
        (0x2001_0000 << 96, 23),      // 2001::/23 protocol assignments, Teredo
        (0x2001_0db8 << 96, 32),      // 2001:db8::/32 documentation
        (0x0064_ff9b_0001 << 80, 48), // 64:ff9b:1::/48 local NAT64
        (0x3fff << 112, 20),          // 3fff::/20 documentation
    ];
    let n = u128::from(ip);
    // Global unicast is 2000::/3; everything else (loopback, unspecified,
    // ULA fc00::/7, link-local fe80::/10, multicast ff00::/8, discard
    // 100::/64, …) is not.
    let in_2000 = n >> 125 == 0b001;
    in_2000
        && !NOT_GLOBAL
            .iter()
            .any(|&(net, len)| n >> (128 - u32::from(len)) == net >> (128 - u32::from(len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn global(s: &str) -> bool {
        is_global(s.parse().expect("an address"))
    }

    #[test]
    fn blocks_non_global_v4() {
        for s in [
            "127.0.0.1",
            "127.1.2.3",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "203.0.113.9",
        ] {
            assert!(!global(s), "{s} must be blocked");
        }
    }

    #[test]
    fn passes_global_v4() {
        for s in [
            "1.1.1.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "192.169.0.1",
            "93.184.216.34",
        ] {
            assert!(global(s), "{s} is global");
        }
    }

    #[test]
    fn blocks_non_global_v6_and_wrapped_v4() {
        for s in [
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::10.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "2002:0a00:0001::1",
            "2001:db8::1",
            "fec0::1",
            "100::1",
            "3fff::1",
        ] {
            assert!(!global(s), "{s} must be blocked");
        }
    }

    #[test]
    fn passes_global_v6() {
        for s in [
            "2606:4700:4700::1111",
            "2a00:1450:4001::1",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
        ] {
            assert!(global(s), "{s} is global");
        }
    }

    #[test]
    fn allow_list_opens_a_network() {
        let guard = Guard::new(vec!["127.0.0.0/8".parse().expect("cidr")]);
        assert!(guard.permits("127.0.0.1".parse().expect("ip")));
        assert!(guard.permits("::ffff:127.0.0.1".parse().expect("ip")));
        assert!(!guard.permits("::1".parse().expect("ip")));
        assert!(!guard.permits("10.0.0.1".parse().expect("ip")));
    }
}
