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
    fn std_classifiers_agree_where_they_exist() {
        // Whatever the standard library already calls special is not global.
        for s in [
            "0.0.0.0",
            "127.0.0.1",
            "10.0.0.1",
            "169.254.0.1",
            "224.0.0.1",
            "255.255.255.255",
            "192.0.2.1",
            "::",
            "::1",
            "ff02::1",
        ] {
            let ip: IpAddr = s.parse().expect("ip");
            let special = match ip {
                IpAddr::V4(v4) => {
                    v4.is_private()
                        || v4.is_loopback()
                        || v4.is_link_local()
                        || v4.is_multicast()
                        || v4.is_broadcast()
                        || v4.is_documentation()
                        || v4.is_unspecified()
                }
                IpAddr::V6(v6) => v6.is_loopback() || v6.is_multicast() || v6.is_unspecified(),
            };
            assert!(special && !is_global(ip), "{s}");
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

/// Property tests: the classifier against an oracle written independently,
/// as a plain list of CIDRs (IANA's special-purpose registries), over every
/// spelling of an IPv4 address that an IPv6 address can carry.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    const BLOCKED_V4: &[&str] = &[
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
    ];

    /// Native IPv6 networks that are not global (their IPv4-carrying parts,
    /// ::/96, ::ffff:0:0/96, 64:ff9b::/96 and 2002::/16, are judged by the
    /// IPv4 address inside and tested separately).
    const BLOCKED_V6: &[&str] = &[
        "::/128",
        "::1/128",
        "100::/64",
        "64:ff9b:1::/48",
        "2001::/23",
        "2001:db8::/32",
        "3fff::/20",
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
        // Outside 2000::/3 nothing is allocated for global unicast.
        "4000::/2",
        "8000::/1",
        "1000::/4",
        "0100::/8",
        "0200::/7",
        "0400::/6",
        "0800::/5",
    ];

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().expect("cidr")).collect()
    }

    fn blocked_v4_oracle(ip: Ipv4Addr) -> bool {
        nets(BLOCKED_V4).iter().any(|n| n.contains(&IpAddr::V4(ip)))
    }

    /// An address inside `net`, from a random number.
    fn inside(net: &IpNet, seed: u128) -> IpAddr {
        match net {
            IpNet::V4(n) => {
                let host = (seed as u32) & !u32::from(n.netmask());
                IpAddr::V4(Ipv4Addr::from(u32::from(n.network()) | host))
            }
            IpNet::V6(n) => {
                let host = seed & !u128::from(n.netmask());
                IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | host))
            }
        }
    }

    /// Every IPv6 spelling of an IPv4 address: mapped, compatible, NAT64 and
    /// 6to4 (with an arbitrary subnet and interface part).
    fn v6_spellings(v4: Ipv4Addr, noise: u128) -> Vec<Ipv6Addr> {
        let n = u128::from(u32::from(v4));
        let mut out = vec![
            v4.to_ipv6_mapped(),
            Ipv6Addr::from(n),
            Ipv6Addr::from((0x0064_ff9b_u128 << 96) | n),
            Ipv6Addr::from((0x2002_u128 << 112) | (n << 80) | (noise & ((1 << 80) - 1))),
        ];
        // ::0.0.0.0 and ::0.0.0.1 are IPv6's own :: and ::1 (both blocked).
        if n <= 1 {
            out.remove(1);
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn every_blocked_v4_is_blocked_in_every_spelling(
            which in 0..BLOCKED_V4.len(), seed in any::<u128>(), noise in any::<u128>()
        ) {
            let IpAddr::V4(v4) = inside(&nets(BLOCKED_V4)[which], seed) else { unreachable!() };
            prop_assert!(!is_global(IpAddr::V4(v4)), "{v4}");
            prop_assert!(!Guard::default().permits(IpAddr::V4(v4)));
            for v6 in v6_spellings(v4, noise) {
                prop_assert!(!is_global(IpAddr::V6(v6)), "{v6} carries {v4}");
                prop_assert!(!Guard::default().permits(IpAddr::V6(v6)), "{v6}");
            }
        }

        #[test]
        fn every_other_v4_passes_in_every_spelling(bits in any::<u32>(), noise in any::<u128>()) {
            let v4 = Ipv4Addr::from(bits);
            prop_assume!(!blocked_v4_oracle(v4));
            prop_assert!(is_global(IpAddr::V4(v4)), "{v4}");
            for v6 in v6_spellings(v4, noise) {
                prop_assert!(is_global(IpAddr::V6(v6)), "{v6} carries {v4}");
            }
        }

        #[test]
        fn any_v4_agrees_with_the_oracle(bits in any::<u32>()) {
            let v4 = Ipv4Addr::from(bits);
            prop_assert_eq!(is_global(IpAddr::V4(v4)), !blocked_v4_oracle(v4), "{}", v4);
        }

        #[test]
        fn every_blocked_v6_is_blocked(which in 0..BLOCKED_V6.len(), seed in any::<u128>()) {
            let ip = inside(&nets(BLOCKED_V6)[which], seed);
            // Skip the IPv4-carrying parts of ::/8 (tested above).
            prop_assume!(!matches!(ip, IpAddr::V6(v6) if embedded_v4(v6).is_some()));
            prop_assert!(!is_global(ip), "{ip}");
            prop_assert!(!Guard::default().permits(ip), "{ip}");
        }

        #[test]
        fn global_unicast_v6_passes(seed in any::<u128>()) {
            // 2000::/3, minus the special parts and 6to4.
            let ip = Ipv6Addr::from((0b001_u128 << 125) | (seed >> 3));
            let special = nets(BLOCKED_V6).iter().any(|n| n.contains(&IpAddr::V6(ip)))
                || ip.segments()[0] == 0x2002;
            prop_assume!(!special);
            prop_assert!(is_global(IpAddr::V6(ip)), "{ip}");
        }

        #[test]
        fn the_allow_list_opens_exactly_its_network(
            which in 0..BLOCKED_V4.len(), seed in any::<u128>(), other in any::<u32>()
        ) {
            let net = nets(BLOCKED_V4)[which];
            let guard = Guard::new(vec![net]);
            let IpAddr::V4(v4) = inside(&net, seed) else { unreachable!() };
            prop_assert!(guard.permits(IpAddr::V4(v4)));
            prop_assert!(guard.permits(IpAddr::V6(v4.to_ipv6_mapped())));
            let outsider = Ipv4Addr::from(other);
            prop_assume!(!net.contains(&IpAddr::V4(outsider)));
            prop_assert_eq!(guard.permits(IpAddr::V4(outsider)), !blocked_v4_oracle(outsider));
        }
    }
}
