//! A stranger on the LAN: records everything Coterie puts on mDNS. Run it
//! inside a test namespace only (`ip netns exec NS lan-observer SECS IP`).
//!
//! Prints JSON lines: `{"packet": "<hex>", "v6": bool, "at": ms}` for every
//! mDNS packet received over IPv4 or IPv6 (raw, whatever it is), and `{"record": {...}, "at": ms}` for
//! every Coterie service instance resolved (name, host, port, addresses,
//! TXT), until SECS seconds have passed.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use mdns_sd::{ServiceDaemon, ServiceEvent};
use serde_json::json;

fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("usage: lan-observer SECONDS IFACE-IPV4");
    let iface: Ipv4Addr = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .expect("usage: lan-observer SECONDS IFACE-IPV4");
    let start = Instant::now();
    let until = start + Duration::from_secs(secs);
    // Raw packets: a socket of our own on 5353 (shared with the daemon below).
    let sock =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
    sock.set_reuse_address(true).expect("reuse");
    sock.set_reuse_port(true).expect("reuse port");
    sock.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 5353)).into())
        .expect("bind 5353");
    let udp: UdpSocket = sock.into();
    udp.join_multicast_v4(&Ipv4Addr::new(224, 0, 0, 251), &iface)
        .expect("join");
    udp.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    // IPv6 too (ff02::fb on eth0), where the kernel gave eth0 an address.
    let udp6 = std::fs::read_to_string("/sys/class/net/eth0/ifindex")
        .ok()
        .and_then(|i| i.trim().parse::<u32>().ok())
        .and_then(|ifindex| {
            let s6 =
                socket2::Socket::new(socket2::Domain::IPV6, socket2::Type::DGRAM, None).ok()?;
            s6.set_only_v6(true).ok()?;
            s6.set_reuse_address(true).ok()?;
            s6.set_reuse_port(true).ok()?;
            s6.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 5353)).into())
                .ok()?;
            let u: UdpSocket = s6.into();
            u.join_multicast_v6(&"ff02::fb".parse().ok()?, ifindex)
                .ok()?;
            u.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
            Some(u)
        });
    let capture = move |sock: UdpSocket, v6: bool| {
        std::thread::spawn(move || {
            let mut buf = [0u8; 9000];
            while Instant::now() < until {
                if let Ok(n) = sock.recv(&mut buf) {
                    let hex: String = buf[..n].iter().map(|b| format!("{b:02x}")).collect();
                    println!(
                        "{}",
                        json!({"packet": hex, "v6": v6, "at": start.elapsed().as_millis() as u64})
                    );
                }
            }
        })
    };
    let raw = capture(udp, false);
    let raw6 = udp6.map(|u| capture(u, true));
    let daemon = ServiceDaemon::new().expect("mdns");
    let rx = daemon
        .browse(discovery::lan::record::SERVICE_TYPE)
        .expect("browse");
    while Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now());
        let Ok(ev) = rx.recv_timeout(left) else {
            continue;
        };
        if let ServiceEvent::ServiceResolved(info) = ev {
            let txt: Vec<(String, String)> = info
                .txt_properties
                .iter()
                .map(|p| (p.key().to_string(), p.val_str().to_string()))
                .collect();
            let addrs: Vec<String> = info
                .addresses
                .iter()
                .map(|a| a.to_ip_addr().to_string())
                .collect();
            println!(
                "{}",
                json!({"record": {"name": info.fullname, "host": info.host, "port": info.port,
                    "addresses": addrs, "txt": txt}, "at": start.elapsed().as_millis() as u64})
            );
        }
    }
    let _ = daemon.shutdown();
    let _ = raw.join();
    if let Some(r) = raw6 {
        let _ = r.join();
    }
}
