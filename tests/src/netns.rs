//! LAN test hosts: network namespaces joined by a bridge, on a subnet that
//! exists only inside them. Every namespace is deleted when the [`Lan`]
//! drops, also when a test panics. mDNS in tests runs only in these.
//!
//! ```text
//!  <p>h0 (eth0 10.213.X.2, fe80::c7:2) ─┐
//!  <p>h1 (eth0 10.213.X.3, fe80::c7:3) ─┼─ br0 in <p>br
//!  …                                     ┘
//! ```
//!
//! Every host has a fixed IPv6 link-local address (no kernel-generated one,
//! no duplicate address detection delay); [`Lan::v6_only`] leaves IPv4 out.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::Command;

/// One host of the test LAN.
#[derive(Debug, Clone)]
pub struct Host {
    /// Its namespace.
    pub ns: String,
    /// Its IPv4 address (unspecified on an IPv6-only LAN).
    pub ip: Ipv4Addr,
    /// Its IPv6 link-local address, on `eth0`.
    pub ip6: Ipv6Addr,
    /// Whether the LAN has no IPv4.
    pub v6_only: bool,
}

impl Host {
    /// The address a node on this host listens on: IPv4, or the link-local
    /// IPv6 address with its interface on an IPv6-only LAN.
    pub fn listen_host(&self) -> String {
        if self.v6_only {
            format!("[{}%eth0]", self.ip6)
        } else {
            self.ip.to_string()
        }
    }

    /// Replaces the host's link-local address with `new` (an interface
    /// whose address changed).
    pub fn renumber_v6(&mut self, new: Ipv6Addr) {
        let old = format!("{}/64", self.ip6);
        ip(&["-n", &self.ns, "addr", "del", &old, "dev", "eth0"]).expect("remove address");
        let add = format!("{new}/64");
        ip(&["-n", &self.ns, "addr", "add", &add, "dev", "eth0", "nodad"]).expect("add address");
        self.ip6 = new;
    }
}

/// A test LAN of namespaced hosts.
#[derive(Debug)]
pub struct Lan {
    /// The hosts.
    pub hosts: Vec<Host>,
    bridge: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run `ip` (Debian package iproute2): {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Lan {
    /// A LAN of `n` hosts. Needs root (CI runs as root); fails with a clear
    /// message otherwise.
    pub fn new(n: usize) -> Lan {
        Lan::build(n, false)
    }

    /// A LAN of `n` hosts with IPv6 link-local addresses only.
    pub fn v6_only(n: usize) -> Lan {
        Lan::build(n, true)
    }

    fn build(n: usize, v6_only: bool) -> Lan {
        assert!(
            (1..=200).contains(&n),
            "a test LAN has between 1 and 200 hosts"
        );
        let tag: u16 = rand::random();
        let p = format!("ct{tag:04x}");
        let subnet = 16 + (tag % 200) as u8;
        let mut lan = Lan {
            hosts: Vec::new(),
            bridge: format!("{p}br"),
        };
        // Only what this call created is deleted on failure (a name taken by
        // another run is never touched).
        let mut created: Vec<String> = Vec::new();
        let mut setup = || -> Result<Vec<Host>, String> {
            ip(&["netns", "add", &lan.bridge])?;
            created.push(lan.bridge.clone());
            ip(&["-n", &lan.bridge, "link", "add", "br0", "type", "bridge"])?;
            ip(&["-n", &lan.bridge, "link", "set", "br0", "up"])?;
            let mut hosts = Vec::new();
            for i in 0..n {
                let ns = format!("{p}h{i}");
                ip(&["netns", "add", &ns])?;
                created.push(ns.clone());
                let port = format!("p{i}");
                ip(&[
                    "-n",
                    &lan.bridge,
                    "link",
                    "add",
                    &port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    &ns,
                ])?;
                ip(&[
                    "-n",
                    &lan.bridge,
                    "link",
                    "set",
                    &port,
                    "master",
                    "br0",
                    "up",
                ])?;
                let addr = if v6_only {
                    Ipv4Addr::UNSPECIFIED
                } else {
                    let a = Ipv4Addr::new(10, 213, subnet, 2 + i as u8);
                    ip(&["-n", &ns, "addr", "add", &format!("{a}/24"), "dev", "eth0"])?;
                    a
                };
                let ip6 = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0xc7, 2 + i as u16);
                ip(&["-n", &ns, "link", "set", "eth0", "addrgenmode", "none"])?;
                ip(&[
                    "-n",
                    &ns,
                    "addr",
                    "add",
                    &format!("{ip6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ])?;
                ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
                ip(&["-n", &ns, "link", "set", "lo", "up"])?;
                hosts.push(Host {
                    ns,
                    ip: addr,
                    ip6,
                    v6_only,
                });
            }
            Ok(hosts)
        };
        let result = setup();
        match result {
            Ok(h) => lan.hosts = h,
            Err(e) => {
                for ns in &created {
                    let _ = ip(&["netns", "del", ns]);
                }
                std::mem::forget(lan);
                panic!("cannot build the test LAN (needs root and iproute2): {e}");
            }
        }
        lan
    }

    /// Gives the bridge an address on the LAN's subnet (`.1`, a router the
    /// hosts reach over `eth0`) and returns its namespace and address. A
    /// service started there (the private Tor network) is reachable from
    /// every host, and stays reachable while [`Lan::cut`] separates hosts.
    pub fn router(&self) -> (String, Ipv4Addr) {
        let h = self.hosts.first().expect("a LAN has hosts");
        assert!(!h.v6_only, "the router is IPv4");
        let o = h.ip.octets();
        let r = Ipv4Addr::new(o[0], o[1], o[2], 1);
        ip(&[
            "-n",
            &self.bridge,
            "addr",
            "add",
            &format!("{r}/24"),
            "dev",
            "br0",
        ])
        .expect("router address");
        ip(&["-n", &self.bridge, "link", "set", "lo", "up"]).expect("router lo");
        (self.bridge.clone(), r)
    }

    /// Cuts the direct path between hosts `a` and `b` (each drops what it
    /// would send the other); the router stays reachable.
    pub fn cut(&self, a: usize, b: usize) {
        for (x, y) in [(a, b), (b, a)] {
            let dst = format!("{}/32", self.hosts[y].ip);
            ip(&["-n", &self.hosts[x].ns, "route", "add", "blackhole", &dst]).expect("cut");
        }
    }

    /// Restores the path [`Lan::cut`] removed.
    pub fn heal(&self, a: usize, b: usize) {
        for (x, y) in [(a, b), (b, a)] {
            let dst = format!("{}/32", self.hosts[y].ip);
            ip(&["-n", &self.hosts[x].ns, "route", "del", "blackhole", &dst]).expect("heal");
        }
    }

    /// Drops `percent` % of the frames the bridge forwards, at random, in
    /// both directions (nftables in the bridge's namespace: this kernel has
    /// no netem). Also sets up the (empty) chain [`Lan::cut_all`] fills.
    pub fn lossy(&self, percent: u8) {
        assert!(percent < 100, "a loss rate is below 100 %");
        let rules = format!(
            "table bridge coterie_test {{\n\
             \tchain lossy {{ type filter hook forward priority 0; policy accept;\n\
             \t\tnumgen random mod 100 < {percent} drop\n\t}}\n\
             \tchain cut {{ type filter hook forward priority 1; policy accept; }}\n}}\n"
        );
        nft(&self.bridge, &["-f", "-"], Some(&rules)).expect("loss rule (Debian package nftables)");
    }

    /// Cuts every link on the LAN: the bridge forwards nothing, without
    /// telling anyone (packets vanish, as on a Wi-Fi that dropped out).
    /// Needs [`Lan::lossy`] first (with 0 for no loss).
    pub fn cut_all(&self) {
        nft(
            &self.bridge,
            &["add", "rule", "bridge", "coterie_test", "cut", "drop"],
            None,
        )
        .expect("cut rule");
    }

    /// Ends [`Lan::cut_all`].
    pub fn heal_all(&self) {
        nft(
            &self.bridge,
            &["flush", "chain", "bridge", "coterie_test", "cut"],
            None,
        )
        .expect("heal");
    }

    /// A command run inside `host`'s namespace.
    pub fn command(&self, host: usize, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[host].ns]).arg(program);
        c
    }
}

fn nft(ns: &str, args: &[&str], stdin: Option<&str>) -> Result<(), String> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft"])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `nft`: {e}"))?;
    if let Some(mut i) = child.stdin.take() {
        i.write_all(stdin.unwrap_or_default().as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`nft {}` failed (is the Debian package nftables installed?): {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = ip(&["netns", "del", &h.ns]);
        }
        let _ = ip(&["netns", "del", &self.bridge]);
    }
}
